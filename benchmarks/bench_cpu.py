#!/usr/bin/env python
"""CPU benchmark: ``lora_delta`` on a mixed-task batch, C++ core vs a PEFT-style per-adapter loop.

Default problem (issue 4): T = 512 tokens spread over 8 adapters (r16), H = O = 1024, float32, on all
the CPU threads torch uses. Methods, timed in one run on the same inputs:

* ``peft_loop``   PEFT's mixed-batch path (``lora.Linear._mixed_batch_forward``) line for line: per
                  adapter present, a Python list of its tokens, ``(x_i A_iᵀ) B_iᵀ · s_i`` added back
                  with ``result[indices] +=`` (backward through autograd).
* ``cpp``         ``lora_delta(..., backend="cpp")``: the C++/OpenMP kernels, one call.
* ``torch``       ``lora_delta(..., backend="torch")``: the reference, for scale.

Every call gets raw adapter ids, so the routing plan is built inside the timed region (as the loop
groups its tokens inside it), and the bank is a contiguous [N, R, H] / [N, O, R] tensor pair.
``forward+backward`` differentiates x, lora_a and lora_b. Outputs and gradients are checked against the
float64 reference before timing.

    python benchmarks/bench_cpu.py            # writes benchmarks/results/cpu-lora_delta.{json,md}
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import REPO, median_ms, peft_mixed_batch_loop, run_metadata
from switchcit.ops import lora_delta
from switchcit.ops.naive import lora_delta_reference

METHODS = ("peft_loop", "cpp", "torch")
TARGETS = {"forward": 5.0, "forward+backward": 3.0}  # minimum speed-up of cpp over peft_loop


def method(name):
    if name == "peft_loop":
        return peft_mixed_batch_loop
    return lambda x, a, b, ids, scaling: lora_delta(x, a, b, ids, scaling, backend=name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    tokens, hidden, num_adapters, rank = args.tokens, args.hidden, args.adapters, args.rank
    x = torch.randn(tokens, hidden, generator=gen)
    lora_a = torch.randn(num_adapters, rank, hidden, generator=gen) * hidden**-0.5
    lora_b = torch.randn(num_adapters, hidden, rank, generator=gen) * rank**-0.5
    adapter_ids = torch.randint(0, num_adapters, (tokens,), generator=gen)
    grad_out = torch.randn(tokens, hidden, generator=gen)
    scaling = 2.0

    leaves64 = [t.double().requires_grad_() for t in (x, lora_a, lora_b)]
    expected = lora_delta_reference(*leaves64, adapter_ids, scaling)
    expected.backward(grad_out.double())
    bound = 1e-4 * (1 + expected.abs().max().item())

    results = {}
    for name in METHODS:
        fn = method(name)
        leaves = [t.clone().requires_grad_() for t in (x, lora_a, lora_b)]
        out = fn(*leaves, adapter_ids, scaling)
        out.backward(grad_out)
        errors = [(out.double() - expected).abs().max().item()]
        errors += [(leaf.grad.double() - ref.grad).abs().max().item() for leaf, ref in zip(leaves, leaves64)]
        if max(errors) > bound * 10:
            raise AssertionError(f"{name}: max error {max(errors):.3g} (bound {bound * 10:.3g})")

        with torch.no_grad():
            forward = median_ms(lambda fn=fn: fn(x, lora_a, lora_b, adapter_ids, scaling), args.repeats)
        both = median_ms(lambda fn=fn, leaves=leaves: fn(*leaves, adapter_ids, scaling).backward(grad_out),
                         args.repeats)
        results[name] = {"forward": forward, "forward+backward": both, "max_abs_err": max(errors)}
        print(f"{name:10s} forward {forward:8.3f} ms   forward+backward {both:8.3f} ms", flush=True)

    speedup = {kind: results["peft_loop"][kind] / results["cpp"][kind] for kind in TARGETS}
    report = run_metadata(torch.device("cpu")) | {
        "problem": {"tokens": tokens, "hidden": hidden, "out_features": hidden, "adapters": num_adapters,
                    "rank": rank, "dtype": "float32", "repeats": args.repeats, "timer": "time.perf_counter median"},
        "ms": results,
        "cpp_speedup_over_peft_loop": speedup,
        "targets": TARGETS,
        "targets_met": all(speedup[k] >= TARGETS[k] for k in TARGETS),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-lora_delta.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"# lora_delta on CPU: {report['device']}",
        "",
        f"- date (UTC) {report['date_utc']}; torch {report['torch']}, python {report['python']}; "
        f"git {report['git_commit'] or 'n/a'}",
        f"- T={tokens} over {num_adapters} adapters r{rank}, H=O={hidden}, float32; median of {args.repeats} runs (ms)",
        "",
        "| method | forward ms | forward+backward ms |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {r['forward']:.3f} | {r['forward+backward']:.3f} |" for name, r in results.items()]
    lines += ["", f"cpp speed-up over peft_loop: forward {speedup['forward']:.1f}× (target ≥ {TARGETS['forward']}×), "
                  f"forward+backward {speedup['forward+backward']:.1f}× (target ≥ {TARGETS['forward+backward']}×)"]
    (args.out / "cpu-lora_delta.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-1:]))


if __name__ == "__main__":
    main()
