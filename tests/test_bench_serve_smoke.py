"""The serving benchmark runs end to end: its ``--smoke`` run, on the session's tiny run, serves the
same Poisson traffic under every scenario and writes the JSON and markdown reports."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")
pytest.importorskip("peft")

from serve_fixtures import tiny_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_serve_benchmark_smoke(tmp_path, tmp_path_factory):
    run = tiny_run(tmp_path_factory)
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_serve.py", "--smoke", "--run", str(run), "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((tmp_path / "serve-cpu-smoke.json").read_text())
    rows = report["scenarios"]
    assert [row["scenario"] for row in rows] == ["mixed", "one adapter per batch", "auto"]
    for row in rows:
        assert row["requests"] == report["config"]["requests"] == 24
        assert 0 < row["generated_tokens"] <= 24 * report["config"]["max_tokens"]
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("requests_per_s", "tokens_per_s", "wall_s"))
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
        assert 1 <= row["mean_batch_size"] <= report["config"]["max_batch_size"]
    assert "| one adapter per batch |" in (tmp_path / "serve-cpu-smoke.md").read_text()
