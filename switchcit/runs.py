"""The folder a SwitchCIT run leaves for serving (``RUN_DIR/switchcit/``)::

    run.json                 {"base": <base model folder>, "tasks": [...], "adapters": {task: path}, "switch": path}
    adapters/<task>/         one PEFT LoRA folder per task (adapter_config.json + adapter_model.safetensors)
    switch/                  the saved Switch (switch.json + switch.safetensors)

Paths in ``run.json`` are relative to the folder, so a run can be moved or copied whole.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

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


def write_run_manifest(folder: str | Path, base: str | Path, adapters: dict[str, str | Path],
                       switch: str | Path | None) -> Path:
    """Write ``run.json`` atomically; adapter and switch paths are stored relative to ``folder``."""
    folder = Path(folder)
    relative = lambda path: os.path.relpath(Path(path).resolve(), folder.resolve())  # noqa: E731
    manifest = {
        "base": str(base), "tasks": list(adapters),
        "adapters": {task: relative(path) for task, path in adapters.items()},
        "switch": relative(switch) if switch is not None else None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, folder / MANIFEST)
    return folder / MANIFEST


def read_run(folder: str | Path) -> RunManifest:
    """The manifest of ``RUN_DIR`` or of ``RUN_DIR/switchcit`` itself."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() and (folder / SERVE_FOLDER / MANIFEST).is_file():
        folder = folder / SERVE_FOLDER
    if not (folder / MANIFEST).is_file():
        raise FileNotFoundError(f"{folder} is not a SwitchCIT run: no {MANIFEST} in it or in its {SERVE_FOLDER}/ folder")
    manifest = json.loads((folder / MANIFEST).read_text())
    return RunManifest(
        folder=folder, base=manifest["base"], tasks=list(manifest["tasks"]),
        adapters={task: folder / path for task, path in manifest["adapters"].items()},
        switch=folder / manifest["switch"] if manifest.get("switch") else None,
    )
