"""What every benchmark report records about its run: device, date, versions, commit."""
from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def run_metadata(device: torch.device) -> dict:
    """Device name, UTC date, torch/triton/python versions and the git commit of this run."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": name,
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": git_commit(),
    }


def median_ms(fn: Callable[[], object], repeats: int, on_cuda: bool = False) -> float:
    """Median milliseconds per call: ``triton.testing.do_bench`` on CUDA (it warms up itself), else
    ``time.perf_counter`` over ``repeats`` calls after one warm-up call."""
    if on_cuda:
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def warm_up(fn: Callable[[], object], calls: int = 3) -> None:
    """Run ``fn`` off the default stream before a CUDA-graph capture: Triton compiles, cuBLAS picks
    its kernels, and nothing of that is recorded."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(calls):
            fn()
    torch.cuda.current_stream().wait_stream(side)


def capture(fn: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture one call of a warmed-up ``fn``; returns the graph and its static output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def write_results(out: Path, name: str, title: str, meta: dict, rows: list[dict], header: list[str],
                  table: list[list[str]], notes: str = "") -> tuple[Path, Path]:
    """``out/name.json`` (metadata + rows) and ``out/name.md`` (metadata, the table, notes)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# {title}", ""] + [f"- {key}: `{value}`" for key, value in meta.items()] + [""]
    lines += markdown_table(header, table) + ["", notes.strip(), ""]
    md_path.write_text("\n".join(lines))
    return json_path, md_path
