"""What a run keeps on disk to survive ``kill -9``: every file is replaced atomically (a reader, or
a restart, sees the old file or the new one).

    RUN_DIR/config.json                 the run's settings (a restart must give the same)
    RUN_DIR/<method>/state.json         stages done and their scores
    RUN_DIR/<method>/checkpoint.safetensors   the adapter being trained, its AdamW and LR-schedule state, step
    RUN_DIR/<method>/log_history.jsonl  one JSON row per optimizer step (appended; a restart first drops
                                        the rows after the checkpoint it resumes from, then redoes them)

A checkpoint is taken between optimizer steps, so no gradient accumulation is ever half done in one.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "LOG_HISTORY_FILE", "STATE_FILE", "append_log_row", "load_state",
           "resume", "save_checkpoint", "trim_log_history", "write_json_atomic"]

logger = logging.getLogger("switchcit")

CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_HISTORY_FILE = "log_history.jsonl"


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
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """The adapter's weights, AdamW's state per parameter and the schedule's state after ``step``."""
    from safetensors.torch import save_file

    tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():  # AdamW: step, exp_avg, exp_avg_sq
            tensors[f"optim/{name}/{key}"] = value.detach().cpu().reshape(-1).contiguous()
    meta = {"adapter": adapter, "stage": str(stage), "step": str(step),
            "scheduler": json.dumps(scheduler.state_dict())}
    path = method_dir / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".tmp")), metadata=meta)
    os.replace(path.with_suffix(".tmp"), path)


def resume(method_dir: Path, adapter: str, stage: int, params: dict[str, torch.nn.Parameter],
           optimizer: torch.optim.Optimizer | None,
           scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> int:
    """The step to start from: the checkpoint's, if it is this stage's (weights, optimizer and
    schedule restored); for a method that keeps training one adapter, the previous stage's final
    weights (fresh optimizer and schedule)."""
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
        if scheduler is not None:
            scheduler.load_state_dict(json.loads(meta["scheduler"]))
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr  # the schedule's state holds the LR; the optimizer's groups do not
        step = int(meta["step"])
    logger.info("resuming %s at step %d", adapter, step)
    return step


def trim_log_history(method_dir: Path, stage: int, step: int) -> int:
    """Keep the rows of ``log_history.jsonl`` up to ``step`` of ``stage`` (where training resumes) and
    drop the rest, a torn last line included; returns how many rows are kept."""
    path = method_dir / LOG_HISTORY_FILE
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            break  # written when the process was killed
        if (row["stage"], row["step"]) > (stage, step):
            break
        kept.append(line + "\n")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)
    return len(kept)


def append_log_row(method_dir: Path, row: dict) -> None:
    """One optimizer step's row, appended (a kill leaves at most a torn last line)."""
    method_dir.mkdir(parents=True, exist_ok=True)
    with (method_dir / LOG_HISTORY_FILE).open("a") as log:
        log.write(json.dumps(row) + "\n")
