"""The model benchmarks run end to end. bench_model.py's ``--smoke`` run (tiniest Llama, float32, CPU) checks
switchcit's logits against PEFT's, times every method on every batch and writes the JSON and markdown reports."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("base", "peft_1", "peft_mixed_2", "peft_mixed_8", "switchcit_mixed_2", "switchcit_mixed_8")


def test_model_benchmark_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_model.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    report = json.loads((tmp_path / "model-cpu-smoke.json").read_text())
    batches = report["batches"]
    assert [b["kind"] for b in batches] == ["decode", "decode", "prefill"]
    for batch in batches:
        for method in METHODS:
            ms = batch["methods"][method]["eager"]["ms"]
            assert math.isfinite(ms) and ms > 0, (batch["batch"], method)
        check = batch["check"]
        for method in ("switchcit_mixed_2", "switchcit_mixed_8"):
            assert check[method]["eager"] <= check[method]["bound"], (batch["batch"], check)
        assert check["misrouting_effect"] > check["switchcit_mixed_8"]["bound"], check
    assert len(report["headline"]) == len(batches)

    assert "switchcit mixed 8 / base" in (tmp_path / "model-cpu-smoke.md").read_text()


def test_switch_cost_benchmark_smoke(tmp_path):
    """The routing-cost benchmark runs end to end (tiny Llama, CPU, K = 0 and 1) and reports every step."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_switch_cost.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((tmp_path / "switch-cost-smoke.json").read_text())["rows"]
    assert [row["layer"] for row in rows] == [0, 1]
    for row in rows:
        assert len(row["ms"]) == 4 and all(math.isfinite(ms) and ms > 0 for ms in row["ms"].values())
        assert math.isfinite(row["routing_percent"]) and 0 < row["switch_and_plan_percent"] < 100
    assert "routing / routed prefill" in (tmp_path / "switch-cost-smoke.md").read_text()


def test_cpu_linear_decode_and_layer_benchmark_smoke(tmp_path):
    """bench_cpu.py's linear (tiny shapes, both methods checked against float64 first), decode (tiny
    Llama through the engine, kernel and F.linear steps alternating) and layer (each decoder op against
    the PyTorch ops it replaces, checked against float64 first) runs write their reports."""
    for op in ("linear", "decode", "layer"):
        proc = subprocess.run(
            [sys.executable, "benchmarks/bench_cpu.py", "--op", op, "--smoke", "--out", str(tmp_path)],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    linear = json.loads((tmp_path / "cpu-linear-smoke.json").read_text())["rows"]
    assert [(row["layer"], row["rows"]) for row in linear] == [("small", 1), ("small", 5), ("ragged", 1), ("ragged", 5)]
    for row in linear:
        assert row["dispatch"] == "kernel"
        assert all(row[w][m] > 0 for w in ("hot", "cold") for m in ("F.linear", "kernel", "speedup")), row
    decode = json.loads((tmp_path / "cpu-decode-smoke.json").read_text())["rows"]
    assert [row["sequences"] for row in decode] == [1, 2]
    assert all(row["kernel"] > 0 and row["F.linear"] > 0 and row["steps per method"] == 1 for row in decode)
    assert "decode step, kernel (ms)" in (tmp_path / "cpu-decode-smoke.md").read_text()
    layer = json.loads((tmp_path / "cpu-layer-smoke.json").read_text())["rows"]
    assert [row["op"] for row in layer] == ["rms_norm", "add + rms_norm", "rotary"] * 2 + ["decode attention"] * 2
    assert all(row["kernel"] > 0 and row["PyTorch"] > 0 for row in layer)
