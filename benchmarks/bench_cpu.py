#!/usr/bin/env python
"""CPU benchmarks of the C++ core, each against what it replaces, timed alternately in one run:

``--op lora_delta`` (issue 4): ``lora_delta`` on a mixed-task batch, C++ core vs a PEFT-style
per-adapter loop. T = 512 tokens spread over 8 adapters (r16), H = O = 1024, float32, on all the CPU
threads torch uses. Methods, on the same inputs:

* ``peft_loop``   PEFT's mixed-batch path (``lora.Linear._mixed_batch_forward``) line for line: per
                  adapter present, a Python list of its tokens, ``(x_i A_iᵀ) B_iᵀ · s_i`` added back
                  with ``result[indices] +=`` (backward through autograd).
* ``cpp``         ``lora_delta(..., backend="cpp")``: the C++/OpenMP kernels, one call.
* ``torch``       ``lora_delta(..., backend="torch")``: the reference, for scale.

Every call gets raw adapter ids, so the routing plan is built inside the timed region (as the loop
groups its tokens inside it), and the bank is a contiguous [N, R, H] / [N, O, R] tensor pair.
``forward+backward`` differentiates x, lora_a and lora_b. Outputs and gradients are checked against the
float64 reference before timing.

``--op linear``: ``switchcit.ops.linear``'s C++ kernel vs ``F.linear`` (MKL) at SmolLM2-135M's layer
shapes and decode-sized row counts, float32, with the machine's limits measured in the same run (memory
copy and read bandwidth, a 2048³ GEMM). Weights "cold": each call reads a different copy of the weight
(copies totalling 256 MB, past the caches), as a decode step reads each layer's from memory; "hot": the
same weight every call (in cache below a few MB). Outputs are checked against the float64 matmul first.

``--op decode``: one decode step of SmolLM2-135M-Instruct through ``switchcit.engine.Engine`` (100-token
random prompts, every sequence decoding), its linear layers through the kernel (``accelerate_linear``,
what ``SwitchModel`` does) vs ``F.linear`` (``restore_linear``), alternating blocks of steps.

    python benchmarks/bench_cpu.py            # all three: benchmarks/results/cpu-{lora_delta,linear,decode}.{json,md}
    python benchmarks/bench_cpu.py --op linear
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (
    REPO,
    WrongResult,
    gemm_gflops,
    median_ms,
    memory_gbps,
    peft_mixed_batch_loop,
    run_metadata,
    tiny_llama,
    write_results,
)
from switchcit.ops import lora_delta
from switchcit.ops.cpp import cpp_linear
from switchcit.ops.naive import lora_delta_reference

METHODS = ("peft_loop", "cpp", "torch")
TARGETS = {"forward": 5.0, "forward+backward": 3.0}  # minimum speed-up of cpp over peft_loop


def method(name):
    if name == "peft_loop":
        return peft_mixed_batch_loop
    return lambda x, a, b, ids, scaling: lora_delta(x, a, b, ids, scaling, backend=name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=(*OPS, "all"), default="all")
    parser.add_argument("--tokens", type=int, default=512, help="lora_delta")
    parser.add_argument("--hidden", type=int, default=1024, help="lora_delta")
    parser.add_argument("--adapters", type=int, default=8, help="lora_delta")
    parser.add_argument("--rank", type=int, default=16, help="lora_delta")
    parser.add_argument("--repeats", type=int, default=50, help="lora_delta")
    parser.add_argument("--rows", default="1,4,16,64,96,128", help="linear: rows of x, comma-separated")
    parser.add_argument("--sequences", default="1,16,64", help="decode: sequences per step, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="linear, decode: tiny shapes and model, few repeats (CI)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    for op in OPS if args.op == "all" else (args.op,):
        OPS[op](args)


def bench_lora_delta(args) -> None:
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


# (name, O, H) of SmolLM2-135M's linear layers.
LINEAR_SHAPES = [("q_proj, o_proj", 576, 576), ("k_proj, v_proj", 192, 576), ("gate_proj, up_proj", 1536, 576),
                 ("down_proj", 576, 1536), ("lm_head", 49152, 576)]
SMOKE_LINEAR_SHAPES = [("small", 40, 24), ("ragged", 37, 19)]
COLD_BYTES = 256 << 20  # weight copies cycled through per shape: past any cache


def bench_linear(args) -> None:
    from switchcit.ops.dense import MAX_ROWS, uses_kernel

    gen = torch.Generator().manual_seed(0)
    shapes, rows_list = (SMOKE_LINEAR_SHAPES, [1, 5]) if args.smoke else (LINEAR_SHAPES, _ints(args.rows))
    load = os.getloadavg()[0]
    limits = {} if args.smoke else memory_gbps() | {"float32 GEMM 2048³ GFLOP/s": gemm_gflops(2048)}
    rows_out = []
    for name, out_features, hidden in shapes:
        weight = torch.randn(out_features, hidden, generator=gen) * hidden**-0.5
        copies = [weight] + [weight.clone() for _ in range(1, max(1, COLD_BYTES // weight.nbytes))]
        for rows in rows_list:
            x = torch.randn(rows, hidden, generator=gen)
            with torch.no_grad():
                expected = x.double() @ weight.double().T
                bound = 1e-5 * (1 + expected.abs().max().item())
                for method, fn in LINEAR_METHODS.items():
                    error = (fn(x, weight).double() - expected).abs().max().item()
                    if error > bound:
                        raise WrongResult(f"{method} {name} M={rows}: max error {error:.3g} (bound {bound:.3g})")
                row = {"layer": name, "out_features": out_features, "hidden": hidden, "rows": rows,
                       "dispatch": "kernel" if uses_kernel(x, weight) else "F.linear"}
                for weights, pool in (("hot", [weight]), ("cold", copies)):
                    repeats = 3 if args.smoke else max(7 if out_features > 10_000 else 41, len(pool) + 1)
                    row[weights] = alternating_us(x, pool, repeats)
                    row[weights]["speedup"] = row[weights]["F.linear"] / row[weights]["kernel"]
            rows_out.append(row)
            print(f"{name:18s} M={rows:3d}  " + "   ".join(
                f"{w}: F.linear {r['F.linear']:7.0f} us, kernel {r['kernel']:7.0f} us ({r['speedup']:.2f}x)"
                for w, r in ((w, row[w]) for w in ("hot", "cold"))), flush=True)
    meta = run_metadata(torch.device("cpu")) | _cpu() | {
        "dtype": "float32", "timer": "time.perf_counter, median; F.linear and the kernel alternate call by call",
        "load average (1 min) at start / end": f"{load:.2f} / {os.getloadavg()[0]:.2f}",
        "switchcit.ops.linear dispatch": f"kernel for at most {MAX_ROWS[torch.float32]} rows (float32), grad mode off",
        **{k: round(v, 1) for k, v in limits.items()},
        "command": "python benchmarks/bench_cpu.py --op linear" + (" --smoke" if args.smoke
                                                                  else f" --rows {args.rows}"),
    }
    header = ["layer (O × H)", "rows M", "F.linear cold µs", "kernel cold µs", "speed-up cold", "F.linear hot µs",
              "kernel hot µs", "speed-up hot", "ops.linear runs"]
    table = [[f"{r['layer']} ({r['out_features']} × {r['hidden']})", str(r["rows"]),
              *(f"{r[w][k]:.0f}" if k != "speedup" else f"{r[w][k]:.2f}×"
                for w in ("cold", "hot") for k in ("F.linear", "kernel", "speedup")), r["dispatch"]] for r in rows_out]
    name = "cpu-linear-smoke" if args.smoke else "cpu-linear"
    _, md = write_results(args.out, name, f"Dense linear layer on CPU: {meta['device']}", meta, rows_out, header,
                          table, notes=LINEAR_NOTES)
    print(md.read_text())


LINEAR_NOTES = """
x [M, H] · W[O, H]ᵀ, float32. Cold: every call reads another copy of W (256 MB of copies per shape),
as a decode step reads every layer's weight from memory; hot: the same W every call. Both methods are
timed alternately, call by call, on the same inputs; medians. The kernel is `switchcit::cpp_linear`
(`csrc/linear_cpu.cpp`); `switchcit.ops.linear` runs it for the rows marked "kernel".
"""


LINEAR_METHODS = {"F.linear": lambda x, w: F.linear(x, w), "kernel": lambda x, w: cpp_linear(x, w, None)}


def alternating_us(x: torch.Tensor, weights: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median µs per call of each of LINEAR_METHODS on x, the methods taking turns call by call (load from
    other processes falls on both alike), each call on the next weight of ``weights``."""
    for fn in LINEAR_METHODS.values():
        fn(x, weights[0])
    samples = {name: [] for name in LINEAR_METHODS}
    for i in range(repeats):
        for name, fn in LINEAR_METHODS.items():
            weight = weights[(i + 1) % len(weights)]
            start = time.perf_counter()
            fn(x, weight)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def bench_decode(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from switchcit.adapters import load_adapters
    from switchcit.engine import Engine, EngineRequest, SamplingParams
    from switchcit.modules import accelerate_linear, restore_linear
    from switchcit.pipeline import SwitchModel
    from switchcit.pretrained import smollm2_135m_instruct

    folder = tiny_llama(Path(tempfile.mkdtemp())) if args.smoke else smollm2_135m_instruct()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_adapters(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), {})
    pipeline = SwitchModel(model, tokenizer)  # applies accelerate_linear
    prompt_len, blocks, steps = (8, 2, 2) if args.smoke else (100, 8, 5)
    gen = torch.Generator().manual_seed(0)
    load, rows = os.getloadavg()[0], []
    for sequences in [1, 2] if args.smoke else _ints(args.sequences):
        tokens = blocks * steps + 2  # the prefill's step decodes too; then one token a step
        engine = Engine(pipeline, max_num_seqs=sequences, max_model_len=prompt_len + tokens + 1,
                        max_num_batched_tokens=sequences * prompt_len, stop_ids=[])
        for _ in range(sequences):
            prompt = torch.randint(100, 40_000, (prompt_len,), generator=gen).tolist()
            engine.add(EngineRequest(prompt, SamplingParams(max_tokens=tokens), lambda *a: None))
        engine.step()  # the prefill (and a first decode step)
        times = {"kernel": [], "F.linear": []}
        for block in range(blocks):  # kernel and F.linear blocks alternate, the first step of each not counted
            method = "kernel" if block % 2 == 0 else "F.linear"
            (accelerate_linear if method == "kernel" else restore_linear)(model)
            for step in range(steps):
                start = time.perf_counter()
                engine.step()
                if step:
                    times[method].append((time.perf_counter() - start) * 1e3)
        accelerate_linear(model)
        row = {"sequences": sequences, **{k: statistics.median(v) for k, v in times.items()},
               "steps per method": len(times["kernel"])}
        row["speedup"] = row["F.linear"] / row["kernel"]
        rows.append(row)
        print(f"{sequences:3d} sequences: decode step F.linear {row['F.linear']:.1f} ms, kernel {row['kernel']:.1f} ms "
              f"({row['speedup']:.2f}x)", flush=True)
    import transformers

    meta = run_metadata(torch.device("cpu")) | _cpu() | {
        "model": Path(folder).name, "transformers": transformers.__version__, "dtype": "float32",
        "prompt": f"{prompt_len} random tokens per sequence, every sequence decoding at every step",
        "timer": f"time.perf_counter per Engine.step, median; {blocks // 2} blocks of {steps} steps per method, "
                 "alternating, the first step of each block not counted",
        "load average (1 min) at start / end": f"{load:.2f} / {os.getloadavg()[0]:.2f}",
        "command": "python benchmarks/bench_cpu.py --op decode" + (" --smoke" if args.smoke
                                                                  else f" --sequences {args.sequences}"),
    }
    header = ["sequences", "decode step, F.linear (ms)", "decode step, kernel (ms)", "speed-up"]
    table = [[str(r["sequences"]), f"{r['F.linear']:.1f}", f"{r['kernel']:.1f}", f"{r['speedup']:.2f}×"] for r in rows]
    name = "cpu-decode-smoke" if args.smoke else "cpu-decode"
    _, md = write_results(args.out, name, f"Decode step on CPU: {meta['device']}", meta, rows, header, table,
                          notes=DECODE_NOTES)
    print(md.read_text())


DECODE_NOTES = """
One `Engine.step` with every sequence decoding (one token each): the model's linear layers through
`switchcit.ops.linear`'s C++ kernel (`accelerate_linear`, as `SwitchModel` sets up for evaluation and
`switchcit serve`) against `F.linear` (`restore_linear`), in the same process on the same engine,
alternating blocks of steps.
"""


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _cpu() -> dict:
    """The CPU's model name and the vector ISA torch dispatches to."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cpu capability (torch)": torch.backends.cpu.get_cpu_capability()}


OPS = {"lora_delta": bench_lora_delta, "linear": bench_linear, "decode": bench_decode}


if __name__ == "__main__":
    main()
