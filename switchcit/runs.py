"""The folder a SwitchCIT run leaves for serving (``RUN_DIR/switchcit/``)::

    run.json                 {"base": <base model folder>, "tasks": [...], "adapters": {task: path}, "switch": path,
                              "switch_layer": K}   (the adapters cover decoder layers K…L−1 only)
    adapters/<task>/         one PEFT LoRA folder per task (adapter_config.json + adapter_model.safetensors)
    switch/                  the saved Switch (switch.json + switch.safetensors)

Paths in ``run.json`` are relative to the folder, so a run can be moved or copied whole.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from switchcit.cit.checkpoint import write_json_atomic

__all__ = ["RunManifest", "read_run", "write_run_manifest", "SERVE_FOLDER"]

SERVE_FOLDER = "switchcit"
MANIFEST = "run.json"


@dataclass
class RunManifest:
    folder: Path
    base: str
    tasks: list[str]
    adapters: dict[str, Path]
    switch: Path | None
    switch_layer: int | None


def write_run_manifest(folder: str | Path, base: str | Path, adapters: dict[str, str | Path],
                       switch: str | Path | None, switch_layer: int | None = None) -> Path:
    """Write ``run.json`` atomically; adapter and switch paths are stored relative to ``folder``."""
    folder = Path(folder)
    relative = lambda path: os.path.relpath(Path(path).resolve(), folder.resolve())  # noqa: E731
    manifest = {
        "base": str(base), "tasks": list(adapters),
        "adapters": {task: relative(path) for task, path in adapters.items()},
        "switch": relative(switch) if switch is not None else None, "switch_layer": switch_layer,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return folder / MANIFEST


def read_run(folder: str | Path) -> RunManifest:
    """The manifest of ``RUN_DIR`` or of ``RUN_DIR/switchcit`` itself."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and (folder / SERVE_FOLDER / MANIFEST).is_file():
        folder = folder / SERVE_FOLDER
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a SwitchCIT run: no {MANIFEST} in it "
                                f"or in its {SERVE_FOLDER}/ folder")
    manifest = json.loads((folder / MANIFEST).read_text())
    return RunManifest(
        folder=folder, base=manifest["base"], tasks=list(manifest["tasks"]),
        adapters={task: folder / path for task, path in manifest["adapters"].items()},
        switch=folder / manifest["switch"] if manifest.get("switch") else None,
        switch_layer=manifest.get("switch_layer"),
    )
