"""The serving benchmark runs end to end: its ``--smoke`` run starts ``switchcit serve`` on the session's tiny
run as a separate process, twice (two rounds), streams both workloads through it for each switchcit row and
writes the JSON and markdown reports with the medians over the rounds; a bad command line stops it with one
line before any work."""
import json
import math
import statistics
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
BENCH = [sys.executable, "benchmarks/bench_serve.py"]


def test_serve_benchmark_smoke(tmp_path, tmp_path_factory):
    run = tiny_run(tmp_path_factory)
    requests, burst, max_tokens = 10, 6, 3
    proc = subprocess.run(
        [*BENCH, "--smoke", "--run", str(run), "--out", str(tmp_path), "--requests", str(requests),
         "--burst", str(burst), "--max-tokens", str(max_tokens), "--rounds", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((tmp_path / "serve-cpu-smoke.json").read_text())
    rows = report["rows"]
    assert [(row["row"], row["workload"]) for row in rows] == [
        ("switchcit", "poisson"), ("switchcit", "burst"), ("switchcit auto", "poisson"), ("switchcit auto", "burst"),
        ("switchcit base", "poisson"), ("switchcit base", "burst")]
    assert list(report["meta"]["servers"]) == ["switchcit"] and report["meta"]["agreement"] == {}
    for row in rows:
        count = requests if row["workload"] == "poisson" else burst
        assert row["requests"] == count
        assert 0 < row["output_tokens"] <= count * max_tokens  # from the streams' usage chunks
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in ("requests_per_s", "output_tokens_per_s", "wall_s"))
        # every request's first token comes before its end, so the quantiles keep that order
        assert 0 < row["ttft_ms_p50"] <= row["latency_ms_p50"] <= row["latency_ms_p99"] <= row["wall_s"] * 1e3
        assert row["ttft_ms_p50"] <= row["ttft_ms_p99"] <= row["latency_ms_p99"]
        assert len(row["rounds"]) == 2  # each round a fresh server; the row's measures are their medians
        for measure in ("requests_per_s", "latency_ms_p50", "ttft_ms_p99"):
            assert row[measure] == pytest.approx(statistics.median(r[measure] for r in row["rounds"]))
    assert "| switchcit auto | burst |" in (tmp_path / "serve-cpu-smoke.md").read_text()


def test_serve_benchmark_refuses_bad_flags(tmp_path):
    proc = subprocess.run([*BENCH, "--smoke", "--rate", "0", "--vllm-python", str(tmp_path / "missing"),
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--rate" in proc.stderr and "--vllm-python" in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing written
