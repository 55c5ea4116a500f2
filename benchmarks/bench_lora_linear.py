#!/usr/bin/env python
"""Layer benchmark: ``switchcit.lora_linear`` against the base GEMM and two multi-LoRA baselines.

One row = (shape, workload, T). Every method of a row runs in the same process on the same inputs:

* ``base``       ``F.linear(x, W)`` alone (cuBLAS): the floor every LoRA method is divided by.
* ``switchcit``  ``lora_linear(..., backend="triton")`` with a routing plan built once outside the
                 timed region, as a model does (one plan per forward, shared by all layers).
* ``peft_loop``  PEFT's mixed-batch path: base GEMM, then for each adapter present gather its tokens,
                 ``(x_i A_iᵀ) B_iᵀ · s_i`` and ``index_add`` back. Syncs the host, so eager only.
* ``grouped_mm`` base GEMM, then ``F.grouped_mm`` over the tokens sorted by adapter (shrink with
                 ``Aᵀ``, expand with ``Bᵀ``, ``offs`` = int32 cumulative group ends), scale,
                 ``index_add`` back. Uses the plan's sort, so it pays no more set-up than switchcit.
                 If it raises for a row (layout or device limits), the error is recorded, not fatal.

Workloads (Punica's four adapter popularities; a bank of N adapters; all tokens get an adapter;
ids are shuffled so tokens of one adapter are not contiguous):

* ``identical``  every token uses adapter 0.
* ``uniform``    ``min(N, ceil(sqrt(T)))`` adapters with equal shares (±1 token), Punica's rule.
* ``distinct``   token t uses adapter ``t % N``: every token its own adapter while T <= N,
                 then all N adapters evenly.
* ``skewed``     Zipf-like: each token draws adapter k with probability ∝ ``1 / (k + 1)^1.5`` (seeded).

Modes: ``eager`` (each call launched from Python) and ``graph`` (the call captured once in a CUDA
graph after warm-up on a side stream, replays timed). Times are medians: ``triton.testing.do_bench``
on CUDA, ``time.perf_counter`` on CPU; ratio = method time / base time in the same mode.

Before timing, each method's output (in each mode) is checked against the float64 reference
(``switchcit.reference``; the base GEMM alone for ``base``); a wrong result aborts the run.

    python benchmarks/bench_lora_linear.py              # full sweep on a CUDA GPU (bf16)
    python benchmarks/bench_lora_linear.py --cpu-smoke  # tiny float32 sweep on CPU, Triton interpreter

Writes ``<out>/lora_linear-<device-tag>.json`` and ``.md`` (tag e.g. ``h100``, or ``cpu-smoke``).
"""
from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv[1:]:
    # The smoke run puts Triton kernels on CPU tensors: they need the interpreter, which must be
    # chosen before triton or switchcit is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from common import REPO, WrongResult, capture, device_tag, median_ms, peft_mixed_batch_loop, run_metadata, warm_up
from switchcit.ops import lora_linear
from switchcit.ops.naive import lora_delta_reference
from switchcit.ops.routing import RoutingPlan, build_routing_plan

WORKLOADS = ("identical", "uniform", "distinct", "skewed")
METHODS = ("base", "switchcit", "peft_loop", "grouped_mm")
MODES = ("eager", "graph")
ZIPF_ALPHA = 1.5

GPU_SWEEP = {"shapes": ("4096x4096r16", "4096x14336r64"), "tokens": (16, 64, 256, 1024, 4096, 8192),
             "adapters": 64, "dtype": torch.bfloat16, "modes": MODES}
SMOKE_SWEEP = {"shapes": ("64x96r16", "64x160r16"), "tokens": (16, 64),
               "adapters": 8, "dtype": torch.float32, "modes": ("eager",)}
SMOKE_REPS = 3

# Max abs error allowed vs the float64 reference, relative to (1 + max |reference|); as in the tests.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}



class Shape(NamedTuple):
    hidden: int
    out_features: int
    rank: int

    @property
    def name(self) -> str:
        return f"{self.hidden}x{self.out_features}r{self.rank}"


class Bank(NamedTuple):
    weight: torch.Tensor  # [O, H]
    lora_a: torch.Tensor  # [N, R, H]
    lora_b: torch.Tensor  # [N, O, R]
    scaling: torch.Tensor  # [N], float32


def parse_shape(spec: str) -> Shape:
    match = re.fullmatch(r"(\d+)x(\d+)r(\d+)", spec)
    if not match:
        raise argparse.ArgumentTypeError(f"shape {spec!r} is not HxOrR, e.g. 4096x14336r64")
    return Shape(*(int(v) for v in match.groups()))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def make_workload(name: str, num_tokens: int, num_adapters: int, gen: torch.Generator) -> torch.Tensor:
    """Adapter id per token (int64, CPU); the definitions are in the module docstring."""
    token = torch.arange(num_tokens)
    if name == "identical":
        ids = torch.zeros(num_tokens, dtype=torch.int64)
    elif name == "uniform":
        ids = token % min(num_adapters, math.isqrt(num_tokens - 1) + 1)  # ceil(sqrt(T)) adapters
    elif name == "distinct":
        ids = token % num_adapters
    elif name == "skewed":
        popularity = torch.arange(1, num_adapters + 1, dtype=torch.float64) ** -ZIPF_ALPHA
        ids = torch.multinomial(popularity, num_tokens, replacement=True, generator=gen)
    else:
        raise ValueError(f"unknown workload {name!r}")
    return ids[torch.randperm(num_tokens, generator=gen)]


def make_bank(shape: Shape, num_adapters: int, dtype: torch.dtype, device: torch.device) -> Bank:
    # Scaled so base output and LoRA term are both ~N(0, 1): a token routed to the wrong adapter
    # moves its output by O(1), far past the tolerance.
    gen = torch.Generator(device).manual_seed(0)
    hidden, out_features, rank = shape

    def randn(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(size, generator=gen, device=device) * std).to(dtype)

    return Bank(
        weight=randn(out_features, hidden, std=hidden**-0.5),
        lora_a=randn(num_adapters, rank, hidden, std=hidden**-0.5),
        lora_b=randn(num_adapters, out_features, rank, std=rank**-0.5),
        scaling=torch.rand(num_adapters, generator=gen, device=device) * 1.5 + 0.5,
    )


def base_method(bank: Bank, x: torch.Tensor, plan: RoutingPlan) -> Callable[[], torch.Tensor]:
    return lambda: F.linear(x, bank.weight)


def switchcit_method(bank: Bank, x: torch.Tensor, plan: RoutingPlan) -> Callable[[], torch.Tensor]:
    return lambda: lora_linear(x, bank.weight, bank.lora_a, bank.lora_b, plan, bank.scaling, backend="triton")


def peft_loop_method(bank: Bank, x: torch.Tensor, plan: RoutingPlan) -> Callable[[], torch.Tensor]:
    return lambda: F.linear(x, bank.weight) + peft_mixed_batch_loop(x, bank.lora_a, bank.lora_b, plan.token_adapter,
                                                                     bank.scaling)


def grouped_mm_method(bank: Bank, x: torch.Tensor, plan: RoutingPlan) -> Callable[[], torch.Tensor]:
    num_adapters = bank.lora_a.shape[0]
    # Per-forward set-up, like the plan itself: sorted order, group ends, per-token scale.
    order = plan.sorted_token_ids.long()
    group_ends = plan.adapter_offsets[1 : num_adapters + 1].clone()  # own, aligned int32 buffer
    token_scale = bank.scaling.to(x.dtype)[plan.token_adapter[order]].unsqueeze(1)
    a_t = bank.lora_a.transpose(1, 2)  # [N, H, R]: grouped_mm wants (groups, K, N)
    b_t = bank.lora_b.transpose(1, 2)  # [N, R, O]

    def run() -> torch.Tensor:
        y = F.linear(x, bank.weight)
        shrunk = F.grouped_mm(x[order], a_t, offs=group_ends)
        delta = F.grouped_mm(shrunk, b_t, offs=group_ends)
        return y.index_add_(0, order, delta * token_scale)

    return run


METHOD_BUILDERS = {
    "base": base_method,
    "switchcit": switchcit_method,
    "peft_loop": peft_loop_method,
    "grouped_mm": grouped_mm_method,
}
EAGER_ONLY = {"peft_loop"}  # host syncs cannot be captured in a CUDA graph
MAY_FAIL = {"grouped_mm"}  # device, dtype and layout limits vary with the torch build


def checked_error(label: str, out: torch.Tensor, ref: torch.Tensor, bound: float) -> float:
    error = (out.double() - ref).abs().max().item()
    if not error <= bound:  # also catches NaN
        raise WrongResult(f"{label}: max abs error {error:.4g} exceeds {bound:.4g}")
    return error


def measure(label: str, fn: Callable[[], torch.Tensor], mode: str, ref: torch.Tensor, bound: float) -> dict:
    """Check one method in one mode against the reference, then time it."""
    if mode == "graph":
        warm_up(fn)
        graph, out = capture(fn)
        graph.replay()
        run = graph.replay
    else:
        out, run = fn(), fn
    error = checked_error(f"{label} {mode}", out, ref, bound)
    return {"us": median_ms(run, SMOKE_REPS, ref.is_cuda) * 1e3, "max_abs_err": error}


def run_row(shape: Shape, bank: Bank, workload: str, num_tokens: int, modes: tuple[str, ...]) -> dict:
    device, dtype = bank.weight.device, bank.weight.dtype
    num_adapters = bank.lora_a.shape[0]
    gen = torch.Generator().manual_seed(num_tokens)
    ids = make_workload(workload, num_tokens, num_adapters, gen)
    adapters_used = ids.unique().numel()
    ids = ids.to(device)
    x = torch.randn(num_tokens, shape.hidden, generator=gen).to(device, dtype)
    plan = build_routing_plan(ids, num_adapters)  # once per forward, outside the timed region

    x64 = x.double()
    base_ref = F.linear(x64, bank.weight.double())
    ref = base_ref + lora_delta_reference(x64, bank.lora_a.double(), bank.lora_b.double(), ids, bank.scaling.double())
    bound = TOLERANCE[dtype] * (1 + ref.abs().max().item())

    label = f"{shape.name} {workload} T={num_tokens}"
    methods = {}
    for name, build in METHOD_BUILDERS.items():
        fn = build(bank, x, plan)
        methods[name] = {}
        expected = base_ref if name == "base" else ref
        for mode in modes:
            if mode == "graph" and name in EAGER_ONLY:
                methods[name][mode] = None
                continue
            try:
                methods[name][mode] = measure(f"{label} {name}", fn, mode, expected, bound)
            except WrongResult:
                raise
            except Exception as err:
                if name not in MAY_FAIL:
                    raise
                first_line = next(iter(str(err).splitlines()), "")
                methods[name][mode] = {"error": f"{type(err).__name__}: {first_line[:300]}"}
    for mode in modes:
        base_us = methods["base"][mode]["us"]
        for result in methods.values():
            if result[mode] is not None and "us" in result[mode]:
                result[mode]["ratio"] = result[mode]["us"] / base_us

    return {
        "shape": shape.name, "hidden": shape.hidden, "out_features": shape.out_features, "rank": shape.rank,
        "workload": workload, "tokens": num_tokens, "adapters_used": adapters_used,
        "tolerance": bound, "methods": methods,
    }


def progress_line(row: dict, modes: tuple[str, ...]) -> str:
    parts = [f"{row['shape']} {row['workload']:<9} T={row['tokens']:<5}"]
    for mode in modes:
        cells = [f"{name} {cell(row['methods'][name][mode])}" for name in METHODS]
        parts.append(f"[{mode}] " + ", ".join(cells))
    return "  ".join(parts)


def cell(result: dict | None) -> str:
    if result is None:
        return "—"
    if "error" in result:
        return "error"
    return f"{result['us']:.1f} ({result['ratio']:.2f}×)"


def summarize(rows: list[dict], modes: tuple[str, ...]) -> dict:
    """Per mode: geometric mean of time/base per method (over rows where it ran) and switchcit's worst row."""
    summary = {}
    for mode in modes:
        geomean = {}
        for name in METHODS[1:]:
            ratios = [r["methods"][name][mode]["ratio"] for r in rows if "ratio" in (r["methods"][name][mode] or {})]
            geomean[name] = {
                "ratio": math.exp(statistics.fmean(map(math.log, ratios))) if ratios else None,
                "rows": len(ratios),
            }
        worst = max(rows, key=lambda r: r["methods"]["switchcit"][mode]["ratio"])
        summary[mode] = {
            "geomean_ratio": geomean,
            "switchcit_worst": {key: worst[key] for key in ("shape", "workload", "tokens")}
            | {"ratio": worst["methods"]["switchcit"][mode]["ratio"]},
        }
    return summary



def environment(device: torch.device, smoke: bool, sweep: dict, modes: tuple[str, ...]) -> dict:
    meta = run_metadata(device)
    return meta | {
        "device_tag": "cpu-smoke" if smoke else device_tag(meta["device"]),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "dtype": str(sweep["dtype"]).removeprefix("torch."),
        "num_adapters": sweep["adapters"],
        "modes": list(modes),
        "timer": "time.perf_counter median" if smoke else "triton.testing.do_bench median",
        "zipf_alpha": ZIPF_ALPHA,
    }


def write_markdown(path: Path, env: dict, rows: list[dict], summary: dict) -> None:
    lines = [
        f"# lora_linear layer benchmark: {env['device']}",
        "",
        f"- date (UTC) {env['date_utc']}; torch {env['torch']}, triton {env['triton']}, "
        f"python {env['python']}; git {env['git_commit'] or 'n/a'}",
        f"- {env['dtype']}, bank of {env['num_adapters']} adapters, {env['timer']}"
        + (", Triton interpreter" if env["triton_interpret"] else ""),
        "- µs per call; (×) = time / base time in the same mode; — = not applicable. "
        "Workloads and methods: see the docstring of benchmarks/bench_lora_linear.py.",
    ]
    for mode in env["modes"]:
        lines += ["", f"## {mode}", "", "| shape | workload | T | base µs | " + " | ".join(METHODS[1:]) + " |",
                  "|---|---|---:|---:|" + "---:|" * (len(METHODS) - 1)]
        for row in rows:
            results = row["methods"]
            cells = [row["shape"], row["workload"], str(row["tokens"]), f"{results['base'][mode]['us']:.1f}"]
            cells += [cell(results[name][mode]) for name in METHODS[1:]]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Summary", ""]
    for mode, stats in summary.items():
        means = ", ".join(
            f"{name} {g['ratio']:.2f}×" + ("" if g["rows"] == len(rows) else f" ({g['rows']} of {len(rows)} rows)")
            for name, g in stats["geomean_ratio"].items() if g["ratio"] is not None
        )
        worst = stats["switchcit_worst"]
        lines += [
            f"- Geometric mean of time / base, {mode}: {means}",
            f"- Worst switchcit row, {mode}: {worst['shape']} {worst['workload']} T={worst['tokens']} "
            f"({worst['ratio']:.2f}×)",
        ]
    errors: dict[str, list[str]] = {}
    for row in rows:
        for name, by_mode in row["methods"].items():
            for mode, result in by_mode.items():
                if result is not None and "error" in result:
                    errors.setdefault(f"{name} ({mode}): {result['error']}", []).append(
                        f"{row['shape']} {row['workload']} T={row['tokens']}")
    if errors:
        lines += ["", "## Errors", ""]
        lines += [f"- {message}: {len(where)} rows, e.g. {where[0]}" for message, where in errors.items()]
    path.write_text("\n".join(lines) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny float32 sweep on CPU through the Triton interpreter (proves the script runs)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--shapes", nargs="+", type=parse_shape, metavar="HxOrR",
                        help=f"default {' '.join(GPU_SWEEP['shapes'])} (smoke: {' '.join(SMOKE_SWEEP['shapes'])})")
    parser.add_argument("--tokens", nargs="+", type=positive_int, metavar="T",
                        help=f"default {GPU_SWEEP['tokens']} (smoke: {SMOKE_SWEEP['tokens']})")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS)
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: both on CUDA, eager in the smoke run")
    args = parser.parse_args(argv)

    sweep = SMOKE_SWEEP if args.cpu_smoke else GPU_SWEEP
    args.shapes = args.shapes or [parse_shape(s) for s in sweep["shapes"]]
    args.tokens = args.tokens or sweep["tokens"]
    args.modes = tuple(m for m in MODES if m in (args.modes or sweep["modes"]))
    if args.cpu_smoke and "graph" in args.modes:
        parser.error("CUDA graphs need a GPU; --cpu-smoke runs eager only")
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: the full sweep needs a GPU (use --cpu-smoke on CPU)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sweep = SMOKE_SWEEP if args.cpu_smoke else GPU_SWEEP
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    env = environment(device, args.cpu_smoke, sweep, args.modes)
    print(f"{env['device']}: torch {env['torch']}, triton {env['triton']}", flush=True)

    rows = []
    with torch.inference_mode():
        for shape in args.shapes:
            bank = make_bank(shape, sweep["adapters"], sweep["dtype"], device)
            for workload in args.workloads:
                for num_tokens in args.tokens:
                    rows.append(run_row(shape, bank, workload, num_tokens, args.modes))
                    print(progress_line(rows[-1], args.modes), flush=True)
            del bank
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next shape's bank and graphs start from free memory

    summary = summarize(rows, args.modes)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"lora_linear-{env['device_tag']}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows, "summary": summary}, indent=1))
    write_markdown(stem.with_suffix(".md"), env, rows, summary)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
