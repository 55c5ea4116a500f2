"""What routing costs next to the forward it routes: the switch head (pooling + MLP + gate + ids; the
fused Triton kernel on CUDA), the routing plan, and the feature pass each feature source needs.

    python benchmarks/bench_switch_cost.py           # CUDA: the 1.1B shape of bench_model.py, bf16
    python benchmarks/bench_switch_cost.py --cpu     # CPU: bench_model.py's CPU shape, fp32

The forward is a prefill of the batch with 8 adapters mixed (switchcit's accelerated PEFT model).
Routing runs once per request (prefill), never per decoded token. Feature sources: ``embeddings``
needs only the embedding lookup; ``last_token`` (the paper's) needs the base model's pass over the
prompt — one more prefill, unless it is read from the same forward (``layer:K``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import ADAPTERS, CPU_SWEEP, GPU_SWEEP, SMOKE_SWEEP, build_model  # noqa: E402
from common import median_ms, run_metadata  # noqa: E402

from switchcit import accelerate, build_routing_plan  # noqa: E402
from switchcit.switch import Switch  # noqa: E402

RETAINED_PER_TASK = 50


def fitted_switch(hidden: int, tasks: int, gen: torch.Generator) -> Switch:
    """A switch fitted on random task clusters (its cost does not depend on what it learned)."""
    centres = torch.randn(tasks, hidden, generator=gen)
    features = torch.cat([centres[t] + 0.3 * torch.randn(RETAINED_PER_TASK, hidden, generator=gen) for t in range(tasks)])
    labels = [ADAPTERS[t] for t in range(tasks) for _ in range(RETAINED_PER_TASK)]
    return Switch.fit(features, features, labels, epochs=2)


def measure(sweep, device: torch.device, repeats: int) -> dict:
    on_cuda = device.type == "cuda"
    model = accelerate(build_model(sweep.shape, sweep.dtype, device))
    batch, seq_len = sweep.prefill
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, sweep.shape.vocab, (batch, seq_len), generator=gen).to(device)
    mask = torch.ones_like(input_ids)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(batch)]
    switch = fitted_switch(sweep.shape.hidden, len(ADAPTERS), gen)
    task_to_adapter = torch.arange(len(ADAPTERS), dtype=torch.int32, device=device)
    base = model.get_base_model()
    with torch.no_grad():
        embeddings = base.get_input_embeddings()(input_ids)
        hidden = torch.randn(embeddings.shape, generator=gen).to(device, embeddings.dtype)
        token_ids = torch.randint(-1, len(ADAPTERS), (batch * seq_len,), generator=gen).to(device)

        timings = {
            "forward (prefill, 8 adapters mixed)": lambda: model(input_ids=input_ids, adapter_names=names),
            "switch head (pool + MLP + gate + ids)": lambda: switch.route_hidden(hidden, embeddings, mask, task_to_adapter),
            "routing plan": lambda: build_routing_plan(token_ids, len(ADAPTERS)),
            "embeddings feature (lookup)": lambda: base.get_input_embeddings()(input_ids),
            "last_token feature (base pass over the prompt)": lambda: model(input_ids=input_ids,
                                                                            adapter_names=["__base__"] * batch),
        }
        ms = {name: median_ms(fn, repeats, on_cuda) for name, fn in timings.items()}
    forward = ms["forward (prefill, 8 adapters mixed)"]
    head, plan = ms["switch head (pool + MLP + gate + ids)"], ms["routing plan"]
    return {
        "batch": [batch, seq_len], "shape": sweep.shape.__dict__, "dtype": str(sweep.dtype),
        "switch": {"tasks": len(ADAPTERS), "hidden_units": switch.mlp[0].out_features,
                   "gate_components": int(switch.gate_components.shape[0])},
        "ms": ms,
        "percent_of_forward": {name: 100 * value / forward for name, value in ms.items()},
        "routing_percent": {
            "embeddings features": 100 * (ms["embeddings feature (lookup)"] + head + plan) / forward,
            "hidden states of the same forward (layer:K)": 100 * (head + plan) / forward,
            "last_token features (separate base pass)": 100 * (ms["last_token feature (base pass over the prompt)"] + head + plan) / forward,
        },
    }


def markdown(report: dict) -> str:
    meta, r = report["metadata"], report["result"]
    lines = [
        f"# Routing cost: {meta['device']}", "",
        f"- date (UTC) {meta['date_utc']}; torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}; "
        f"git {meta['git_commit']}",
        f"- random Llama {r['shape']}, {r['dtype']}; prefill batch {r['batch'][0]}×{r['batch'][1]}; 8 LoRA adapters mixed",
        f"- switch: {r['switch']['tasks']} tasks, MLP hidden {r['switch']['hidden_units']}, "
        f"{r['switch']['gate_components']} gate components; median ms",
        f"- command: `{report['command']}`", "",
        "| step | ms | % of the forward |", "|---|---:|---:|",
    ]
    lines += [f"| {name} | {value:.3f} | {r['percent_of_forward'][name]:.2f}% |" for name, value in r["ms"].items()]
    lines += ["", "Routing (once per request) as % of the routed forward, by feature source:", "",
              "| features | routing / forward |", "|---|---:|"]
    lines += [f"| {name} | {value:.2f}% |" for name, value in r["routing_percent"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="CPU shape, fp32 (default on a machine without CUDA)")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape, for tests")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    on_cuda = torch.cuda.is_available() and not (args.cpu or args.smoke)
    device = torch.device("cuda" if on_cuda else "cpu")
    sweep = SMOKE_SWEEP if args.smoke else GPU_SWEEP if on_cuda else CPU_SWEEP
    report = {"metadata": run_metadata(device), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "result": measure(sweep, device, repeats=3 if args.smoke else 9)}
    tag = "smoke" if args.smoke else "gpu" if on_cuda else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"switch-cost-{tag}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"switch-cost-{tag}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
