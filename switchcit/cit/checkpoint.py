"""What a run keeps on disk to survive ``kill -9``: every file is replaced atomically (a reader, or
a restart, sees the old file or the new one).

    RUN_DIR/config.json                 the run's settings (a restart must give the same)
    RUN_DIR/<method>/state.json         stages done and their scores
    RUN_DIR/<method>/checkpoint.safetensors   the adapter being trained, its AdamW state and step
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "STATE_FILE", "load_state", "resume", "save_checkpoint",
           "write_json_atomic"]

logger = logging.getLogger("switchcit")

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
CHECKPOINT_FILE = "checkpoint.safetensors"


def write_json_atomic(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=1))
    os.replace(temporary, path)


def load_state(method_dir: Path) -> dict:
    path = method_dir / STATE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return {"stages_done": 0, "matrix": [], "switch_accuracy": []}


def save_checkpoint(method_dir: Path, adapter: str, stage: int, step: int, params: dict[str, torch.nn.Parameter],
                    optimizer: torch.optim.Optimizer) -> None:
    from safetensors.torch import save_file

    tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
            tensors[f"optim/{name}/{key}"] = value.detach().cpu().reshape(-1).contiguous()
    meta = {"adapter": adapter, "stage": str(stage), "step": str(step)}
    path = method_dir / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".tmp")), metadata=meta)
    os.replace(path.with_suffix(".tmp"), path)


def resume(method_dir: Path, adapter: str, stage: int, params: dict[str, torch.nn.Parameter],
           optimizer: torch.optim.Optimizer | None) -> int:
    """The step to start from: the checkpoint's, if it is this stage's; for a method that keeps
    training one adapter, the previous stage's final weights (fresh optimizer)."""
    from safetensors import safe_open

    path = method_dir / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        same_stage = meta["adapter"] == adapter and int(meta["stage"]) == stage
        continues = meta["adapter"] == adapter and int(meta["stage"]) < stage
        if not (same_stage or continues):
            return 0
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(f.get_tensor(f"param/{name}"))
        if continues or optimizer is None:
            return 0
        for name, p in params.items():
            optimizer.state[p] = {
                key: f.get_tensor(f"optim/{name}/{key}").reshape(() if key == "step" else p.shape).to(p.device)
                for key in ("step", "exp_avg", "exp_avg_sq")}
        step = int(meta["step"])
    logger.info("resuming %s at step %d", adapter, step)
    return step
