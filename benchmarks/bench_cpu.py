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

``--op layer``: the decoder layer's C++ ops — RMSNorm, the residual add with it, rotary, decode attention
over the slot cache — against the PyTorch ops they replace (transformers' for rotary, SDPA for attention),
at SmolLM2-135M's decode sizes (``--sequences`` tokens and 4; 128 and 512 cached positions).

    python benchmarks/bench_cpu.py            # all: benchmarks/results/cpu-{lora_delta,linear,decode,layer}.{json,md}
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
    parser.add_argument("--sequences", default="1,16,64", help="decode, layer: sequences per step, comma-separated")
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
                    row[weights] = alternating_us(linear_calls(x, pool), repeats)
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


def alternating_us(methods: dict, repeats: int) -> dict[str, float]:
    """Median µs per call of each of ``methods`` (``name → fn(i)``, call ``i``), the methods taking turns
    call by call (load from other processes falls on all alike), after one warm-up call each."""
    for fn in methods.values():
        fn(0)
    samples = {name: [] for name in methods}
    for i in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(i + 1)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def same_call(fn, *args):
    """For :func:`alternating_us`: every call is ``fn(*args)``."""
    return lambda i: fn(*args)


def linear_calls(x: torch.Tensor, weights: list[torch.Tensor]) -> dict:
    """LINEAR_METHODS on x, call i on the i-th weight of ``weights`` (cycled)."""
    return {name: (lambda i, fn=fn: fn(x, weights[i % len(weights)])) for name, fn in LINEAR_METHODS.items()}


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


# SmolLM2-135M's layer: hidden 576, 9 query heads over 3 key heads of 64; the engine's cache of 1024 positions.
LAYER_SHAPE = {"hidden": 576, "heads": 9, "kv_heads": 3, "head_dim": 64, "capacity": 1024}
SMOKE_LAYER_SHAPE = {"hidden": 37, "heads": 4, "kv_heads": 2, "head_dim": 16, "capacity": 40}


def bench_layer(args) -> None:
    """The decoder layer's C++ ops (``switchcit.ops.decoder``, the slot attention's decode kernel) against
    the PyTorch ops they replace, at decode sizes; outputs checked against float64 first."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from switchcit.ops.attention import SlotBatch, grouped_attention
    from switchcit.ops.cpp import cpp_decode_attention
    from switchcit.ops.decoder import add_rms_norm, apply_rotary_, rms_norm
    from switchcit.ops.naive import attention_reference, rms_norm_reference, rotary_reference

    shape = SMOKE_LAYER_SHAPE if args.smoke else LAYER_SHAPE
    hidden, heads, kv_heads, dim, capacity = shape.values()
    token_counts, lengths = ([1, 3], [5]) if args.smoke else (_ints(args.sequences) + [4], [128, 512])
    repeats = 3 if args.smoke else 201
    gen = torch.Generator().manual_seed(0)
    load, rows_out = os.getloadavg()[0], []

    def check(name: str, got: torch.Tensor, expected: torch.Tensor) -> None:
        bound = 2e-5 * (1 + expected.abs().max().item())
        error = (got.double() - expected).abs().max().item()
        if error > bound:
            raise WrongResult(f"{name}: max error {error:.3g} (bound {bound:.3g})")

    def measure(op: str, size: str, methods: dict) -> None:
        row = {"op": op, "size": size, **alternating_us(methods, repeats)}
        row["speedup"] = row["PyTorch"] / row["kernel"]
        rows_out.append(row)
        print(f"{op:16s} {size:28s} PyTorch {row['PyTorch']:7.1f} us, kernel {row['kernel']:6.1f} us "
              f"({row['speedup']:.2f}x)", flush=True)

    with torch.no_grad():
        for tokens in sorted(set(token_counts)):
            x, residual = torch.randn(2, tokens, hidden, generator=gen)
            weight = torch.randn(hidden, generator=gen)
            check("rms_norm", rms_norm(x, weight, 1e-5), rms_norm_reference(x.double(), weight.double(), 1e-5))
            measure("rms_norm", f"{tokens} × {hidden}", {"PyTorch": same_call(rms_norm_reference, x, weight, 1e-5),
                                                        "kernel": same_call(rms_norm, x, weight, 1e-5)})
            check("add_rms_norm", add_rms_norm(x, residual, weight, 1e-5)[0],
                  rms_norm_reference((residual + x).double(), weight.double(), 1e-5))
            measure("add + rms_norm", f"{tokens} × {hidden}",
                    {"PyTorch": same_call(lambda a, b, w: rms_norm_reference(b + a, w, 1e-5), x, residual, weight),
                     "kernel": same_call(add_rms_norm, x, residual, weight, 1e-5)})
            q = torch.randn(1, tokens, heads, dim, generator=gen)
            k = torch.randn(1, tokens, kv_heads, dim, generator=gen)
            angles = torch.rand(1, tokens, dim, generator=gen) * 6.3  # a rotation: repeated in place, q stays bounded
            cos, sin = angles.cos(), angles.sin()
            expected = rotary_reference(q.double(), k.double(), cos.double(), sin.double())
            rotated_q, rotated_k = q.clone(), k.clone()
            apply_rotary_(rotated_q, rotated_k, cos, sin)
            check("rotary q", rotated_q, expected[0])
            check("rotary k", rotated_k, expected[1])
            measure("rotary", f"{tokens} tokens, {heads} + {kv_heads} heads",  # transformers' on its layout
                    {"PyTorch": same_call(apply_rotary_pos_emb, q.transpose(1, 2), k.transpose(1, 2), cos, sin),
                     "kernel": same_call(apply_rotary_, q, k, cos, sin)})
        for sequences in sorted(set(token_counts)):
            for length in lengths:
                keys, values = torch.randn(2, sequences, kv_heads, capacity, dim, generator=gen)
                query = torch.randn(sequences, heads, dim, generator=gen)
                batch = SlotBatch.build([length - 1] * sequences, [], sequences, torch.float32, torch.device("cpu"))
                positions, mask = batch.positions, batch.decode_mask
                got = cpp_decode_attention(query, keys, values, positions, dim**-0.5)
                check("decode attention", got, attention_reference(
                    query.double()[:, :, None], keys[:, :, :length].double(), values[:, :, :length].double(),
                    None, dim**-0.5)[:, 0])
                measure("decode attention", f"{sequences} slots × {length} positions",
                        {"PyTorch": same_call(grouped_attention, query[:, :, None], keys[:, :, :length],
                                              values[:, :, :length], mask, dim**-0.5),
                         "kernel": same_call(cpp_decode_attention, query, keys, values, positions, dim**-0.5)})
    meta = run_metadata(torch.device("cpu")) | _cpu() | {
        "dtype": "float32", "shape": str(shape),
        "timer": f"time.perf_counter, median of {repeats} calls each; the two methods alternate call by call",
        "PyTorch": "rms_norm_reference (LlamaRMSNorm's ops), transformers' apply_rotary_pos_emb, SDPA with enable_gqa "
                   "and the decode mask (slot_attention without the kernel)",
        "load average (1 min) at start / end": f"{load:.2f} / {os.getloadavg()[0]:.2f}",
        "command": "python benchmarks/bench_cpu.py --op layer" + (" --smoke" if args.smoke
                                                                 else f" --sequences {args.sequences}"),
    }
    header = ["op", "size", "PyTorch µs", "kernel µs", "speed-up"]
    table = [[r["op"], r["size"], f"{r['PyTorch']:.1f}", f"{r['kernel']:.1f}", f"{r['speedup']:.2f}×"]
             for r in rows_out]
    name = "cpu-layer-smoke" if args.smoke else "cpu-layer"
    _, md = write_results(args.out, name, f"Decoder-layer ops on CPU: {meta['device']}", meta, rows_out, header,
                          table, notes=LAYER_NOTES)
    print(md.read_text())


LAYER_NOTES = """
One call of each op at decode sizes, on torch's threads, in inference (grad mode off, as the engine runs):
the C++ kernel (`csrc/decoder_cpu.cpp`) against the PyTorch ops it replaces in a Llama layer, the two
alternating call by call on the same inputs; medians. Each kernel's output is checked against float64 first.
"""


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _cpu() -> dict:
    """The CPU's model name and the vector ISA torch dispatches to."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": model, "cpu capability (torch)": torch.backends.cpu.get_cpu_capability()}


OPS = {"lora_delta": bench_lora_delta, "linear": bench_linear, "decode": bench_decode, "layer": bench_layer}


if __name__ == "__main__":
    main()
