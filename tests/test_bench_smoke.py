"""The layer benchmark runs end to end: its ``--cpu-smoke`` sweep (float32, Triton interpreter) checks
every method against the reference and writes the JSON and markdown reports."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_WORKLOADS = ("identical", "uniform", "distinct", "skewed")
SMOKE_TOKENS = (16, 64)


def test_cpu_smoke_sweep(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_lora_linear.py", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    rows = json.loads((tmp_path / "lora_linear-cpu-smoke.json").read_text())["rows"]
    shapes = {row["shape"] for row in rows}
    keys = sorted((row["shape"], row["workload"], row["tokens"]) for row in rows)
    assert keys == sorted((s, w, t) for s in shapes for w in SMOKE_WORKLOADS for t in SMOKE_TOKENS)
    for row in rows:
        switchcit = row["methods"]["switchcit"]["eager"]
        assert math.isfinite(switchcit["us"]) and switchcit["us"] > 0, row
        assert switchcit["max_abs_err"] <= row["tolerance"], row

    assert "Geometric mean" in (tmp_path / "lora_linear-cpu-smoke.md").read_text()
