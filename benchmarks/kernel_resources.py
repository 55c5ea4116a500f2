#!/usr/bin/env python
"""Registers, spills and shared memory of every Triton kernel, compiled for sm_80 and sm_90 without a GPU.

The Triton dispatch (``switchcit.ops.triton.TritonKernels``, forward and backward, and
``switchcit.kernels.fused_switch_route``) runs on meta tensors, and every kernel launch it would make is
recorded instead, with the shrink's split-K chosen for the target GPU's SM count (A100 108, H100 132).
Each distinct launch is specialised as Triton's JIT specialises it (argument dtypes, constexprs, 16-byte
divisibility), compiled with ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``, and its PTX
put through ``ptxas -v`` (the ptxas Triton ships, with Triton's flags): registers, spill stores and
loads, stack. Shared memory is what the launch requests (Triton's metadata).

    python benchmarks/kernel_resources.py          # the model shapes → results/kernel-resources.{json,md}
    python benchmarks/kernel_resources.py --check  # every dtype and launch configuration the dispatcher
                                                   # can choose (tests/ops/test_compile.py runs it)

Model shapes (bench_model's): 4096→4096 r16, 4096→14336 r64, and the layers of the 1.1B Llama (hidden
2048, intermediate 5632, 4 KV heads of 64: q/o 2048→2048, k/v 2048→256, gate/up 2048→5632, down
5632→2048) r16; 8 adapters with int32 ranks and float32 scaling (as switchcit's layers pass them),
bfloat16, T = 16, 32, …, 8192 tokens, forward and backward. The switch: 2048-d features, 200 hidden
units, 8 tasks, 128 gate components, 16 sequences of 512 tokens, both poolings.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compiled for GPUs: the interpreter would replace the kernels

import torch  # noqa: E402
import triton  # noqa: E402
from common import run_metadata, write_results  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import switchcit.kernels.lora as lora_kernels  # noqa: E402
import switchcit.kernels.switch as switch_kernels  # noqa: E402
from switchcit.kernels import fused_switch_route  # noqa: E402
from switchcit.ops.routing import build_routing_plan  # noqa: E402
from switchcit.ops.triton import TritonKernels  # noqa: E402

SM_COUNT = {80: 108, 90: 132}  # compute capability → SMs of its GPU (A100, H100): split-K depends on it
KERNELS = {lora_kernels: ("_lora_shrink_kernel", "_lora_expand_kernel", "_lora_weight_grad_kernel"),
           switch_kernels: ("_pool_kernel", "_classify_kernel")}
# Launches of one layer, in the order TritonKernels makes them.
FORWARD_ROLES = ("forward shrink x·Aᵀ", "forward expand +P·Bᵀ")
BACKWARD_ROLES = ("backward shrink dy·B", "backward expand dx", "backward weight grad dA", "backward weight grad dB")
SWITCH_ROLES = ("switch pool", "switch classify")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton backend takes
MODEL_LAYERS = {"4096→4096 r16": (4096, 4096, 16), "4096→14336 r64": (4096, 14336, 64),
                "1.1B q/o 2048→2048 r16": (2048, 2048, 16), "1.1B k/v 2048→256 r16": (2048, 256, 16),
                "1.1B gate/up 2048→5632 r16": (2048, 5632, 16), "1.1B down 5632→2048 r16": (5632, 2048, 16)}
MODEL_TOKENS = tuple(2**i for i in range(4, 14))  # 16 … 8192
ADAPTERS = 8


@dataclass
class Launch:
    """One kernel launch the dispatcher would make, and what made it."""

    kernel: triton.runtime.JITFunction
    args: tuple
    kwargs: dict
    role: str
    workload: str


@contextlib.contextmanager
def recorded_launches(sm_count: int) -> Iterator[list[tuple]]:
    """Kernel launches recorded as ``(kernel, args, kwargs)`` instead of run; split-K for ``sm_count`` SMs."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    def pick_config(max_tiles, reduction, device):
        return lora_kernels.cuda_config(max_tiles, reduction, sm_count)

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(lora_kernels, "pick_config", pick_config))
        for module, names in KERNELS.items():
            for name in names:
                patches.enter_context(mock.patch.object(module, name, Recorder(getattr(module, name))))
        yield launches


def meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def lora_layer(dtype: torch.dtype, tokens: int, hidden: int, out_features: int, rank: int,
               ranks_dtype: torch.dtype | None = torch.int32,
               scaling_dtype: torch.dtype | None = torch.float32) -> tuple[Callable[[], None], tuple[str, ...]]:
    """One layer's LoRA term through the Triton dispatch, forward and backward, and its launches' roles."""

    def run():
        x, grad_out = meta(tokens, hidden, dtype=dtype), meta(tokens, out_features, dtype=dtype)
        lora_a, lora_b = meta(ADAPTERS, rank, hidden, dtype=dtype), meta(ADAPTERS, out_features, rank, dtype=dtype)
        plan = build_routing_plan(meta(tokens, dtype=torch.int64), ADAPTERS, tiles=True)
        ranks = None if ranks_dtype is None else meta(ADAPTERS, dtype=ranks_dtype)
        scaling = None if scaling_dtype is None else meta(ADAPTERS, dtype=scaling_dtype)
        shrunk = TritonKernels.forward(meta(tokens, out_features, dtype=dtype), x, lora_a, lora_b, plan, scaling,
                                       1.0, ranks, save=True)
        TritonKernels.backward(grad_out, x, lora_a, lora_b, shrunk, plan, scaling, 1.0, ranks, (True, True, True))

    return run, FORWARD_ROLES + BACKWARD_ROLES


def switch(dtype: torch.dtype, batch: int, seq_len: int, features: int, hidden_units: int, tasks: int,
           components: int, pool_last: bool) -> tuple[Callable[[], None], tuple[str, ...]]:
    """The fused switch on one batch (float32 switch parameters, as ``switch_route`` passes them)."""

    def run():
        fp32 = torch.float32
        fused_switch_route(
            meta(batch, seq_len, features, dtype=dtype), meta(batch, seq_len, features, dtype=dtype),
            meta(batch, seq_len, dtype=torch.int64), meta(features, dtype=fp32), meta(features, dtype=fp32),
            meta(hidden_units, features, dtype=fp32), meta(hidden_units, dtype=fp32), meta(tasks, hidden_units, dtype=fp32),
            meta(tasks, dtype=fp32), meta(features, dtype=fp32), meta(features, dtype=fp32),
            meta(tasks, features, dtype=fp32), meta(components, features, dtype=fp32), 1.0, float("inf"), 0.0,
            meta(tasks, dtype=torch.int32), pool_last,
        )

    return run, SWITCH_ROLES


def model_workloads() -> dict[str, tuple]:
    """bench_model's layer shapes at every token count, and the switch on a 16 × 512 prefill."""
    workloads = {f"{layer} T={tokens}": lora_layer(torch.bfloat16, tokens, *shape)
                 for layer, shape in MODEL_LAYERS.items() for tokens in MODEL_TOKENS}
    for pool in ("last", "mean"):
        workloads[f"switch 16×512 pool={pool}"] = switch(torch.bfloat16, 16, 512, 2048, 200, 8, 128, pool == "last")
    return workloads


def check_workloads() -> dict[str, tuple]:
    """Every dtype and launch configuration the dispatcher can choose: 16- and 64-row tiles (T ≤ 128 or
    more), one or several shrink splits (reductions of 256 or 1024), ranks and scaling as tensors or not;
    the switch with both poolings, the largest head blocks (256 hidden units, 128 gate components) and
    small ones."""
    workloads = {}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for tokens in (16, 2048):
            for width in (256, 1024):
                workloads[f"{name} T={tokens} {width}→{width} r16"] = lora_layer(dtype, tokens, width, width, 16)
        workloads[f"{name} T=16 1024→1024 r64, no ranks, float scaling"] = lora_layer(
            dtype, 16, 1024, 1024, 64, ranks_dtype=None, scaling_dtype=None)
        for pool in ("last", "mean"):
            workloads[f"{name} switch pool={pool}"] = switch(dtype, 16, 512, 2048, 200, 8, 128, pool == "last")
            workloads[f"{name} switch pool={pool}, small head"] = switch(dtype, 3, 7, 40, 24, 3, 9, pool == "last")
    return workloads


def record(workloads: dict[str, tuple], sm_count: int) -> list[Launch]:
    launches = []
    for workload, (run, roles) in workloads.items():
        with recorded_launches(sm_count) as recorded:
            run()
        assert len(recorded) == len(roles), f"{workload}: {len(recorded)} launches, expected {len(roles)}"
        launches += [Launch(kernel, args, kwargs, role, workload) for (kernel, args, kwargs), role in zip(recorded, roles)]
    return launches


def specialise(launch: Launch, arch: int) -> tuple[ASTSource, dict]:
    """What ``JITFunction.run`` compiles for this launch on ``arch``, without asking a driver: the bound
    and specialised arguments as an ``ASTSource``, and the compile options."""
    kernel, backend = launch.kernel, make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(launch.kwargs, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills and stack from ``ptxas -v`` with the flags Triton's ``make_cubin`` passes."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
             f"--gpu-name={sm_arch_from_capability(arch)}", str(path), "-o", str(path.with_suffix(".cubin"))],
            capture_output=True, text=True, check=True,
        ).stderr
    stack, stores, loads = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                     log).groups()
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)), "spill_stores": int(stores),
            "spill_loads": int(loads), "stack_bytes": int(stack)}


@dataclass
class Compiled:
    """One distinct compiled kernel and the launches that use it."""

    kernel: str
    arch: int
    dtype: str
    constexprs: dict
    num_warps: int
    resources: dict
    roles: set = field(default_factory=set)
    workloads: list = field(default_factory=list)

    def row(self) -> dict:
        return {"kernel": self.kernel, "arch": f"sm_{self.arch}", "dtype": self.dtype, "constexprs": self.constexprs,
                "num_warps": self.num_warps, **self.resources, "roles": sorted(self.roles),
                "workloads": self.workloads}


def compile_all(workloads: dict[str, tuple], log: Callable[[str], None]) -> list[Compiled]:
    compiled: dict[tuple, Compiled] = {}
    for arch, sm_count in SM_COUNT.items():
        for launch in record(workloads, sm_count):
            src, options = specialise(launch, arch)
            key = (arch, src.hash(), options["num_warps"], options["num_stages"])
            if key not in compiled:
                binary = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                names = launch.kernel.arg_names
                constexprs = {names[index[0]]: value for index, value in src.constants.items()}
                compiled[key] = Compiled(launch.kernel.__name__, arch, src.signature[names[0]].lstrip("*"),
                                         constexprs, binary.metadata.num_warps,
                                         {**ptxas_report(binary.asm["ptx"], arch),
                                          "shared_bytes": binary.metadata.shared})
                log(f"sm_{arch} {launch.kernel.__name__} {compiled[key].dtype}: {compiled[key].resources}")
            compiled[key].roles.add(launch.role)
            compiled[key].workloads.append(launch.workload)
    return list(compiled.values())


# Constexprs the table shows (the rest, and integers specialised to 1, are in the JSON).
SHOWN = ("BLOCK_M", "BLOCK_N", "BLOCK_J", "BLOCK_K", "BLOCK_R", "MAX_RANK", "HAS_RANKS", "HAS_SCALING", "DOT_FP32",
         "num_splits", "POOL_LAST", "BLOCK_S", "BLOCK_D", "BLOCK_H")


def workload_summary(workloads: list[str]) -> str:
    """``4096→4096 r16 T=16…128`` for runs of one layer over token counts; other workloads as they are."""
    tokens: dict[str, list[int]] = {}
    for workload in dict.fromkeys(workloads):
        match = re.fullmatch(r"(.*) T=(\d+)(.*)", workload)
        key, count = (match.group(1) + match.group(3), int(match.group(2))) if match else (workload, None)
        tokens.setdefault(key, []).extend([] if count is None else [count])
    return "; ".join(f"{key} T={min(counts)}…{max(counts)}" if len(counts) > 1 else
                     f"{key} T={counts[0]}" if counts else key for key, counts in tokens.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="every dtype and launch configuration (the compile test)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    workloads = check_workloads() if args.check else model_workloads()
    compiled = compile_all(workloads, log=lambda line: print(line, flush=True))
    compiled.sort(key=lambda c: (c.kernel, c.dtype, sorted(c.roles), str(c.constexprs), c.arch))
    spilling = [c for c in compiled if c.resources["spill_stores"] or c.resources["spill_loads"]]

    meta = run_metadata(torch.device("cpu"))
    meta["command"] = "python benchmarks/kernel_resources.py" + (" --check" if args.check else "")
    meta["targets"] = ", ".join(f"sm_{arch} ({count} SMs for split-K)" for arch, count in SM_COUNT.items())
    meta["ptxas"] = ", ".join(f"sm_{arch}: {get_ptxas(arch).version}" for arch in SM_COUNT)
    meta["spills"] = "none" if not spilling else f"{len(spilling)} of {len(compiled)} compiled kernels"
    header = ["kernel", "launches", "dtype", "constexprs", "warps", "arch", "registers", "spill st/ld (B)",
              "stack (B)", "shared (B)", "workloads"]
    table = [[c.kernel, ", ".join(sorted(c.roles)), c.dtype,
              " ".join(f"{k}={v}" for k, v in c.constexprs.items() if k in SHOWN), str(c.num_warps), f"sm_{c.arch}",
              str(c.resources["registers"]), f"{c.resources['spill_stores']}/{c.resources['spill_loads']}",
              str(c.resources["stack_bytes"]), str(c.resources["shared_bytes"]), workload_summary(c.workloads)]
             for c in compiled]
    name = "kernel-resources-check" if args.check else "kernel-resources"
    title = "Triton kernel resources" + (": every dispatchable configuration" if args.check else ": model shapes")
    notes = ("Each row is one distinct compiled kernel (its specialisation: dtypes, constexprs, divisibility) "
             "and the workloads whose launches use it; see the docstring of benchmarks/kernel_resources.py.")
    json_path, md_path = write_results(args.out, name, title, meta, [c.row() for c in compiled], header, table, notes)
    print(f"{len(compiled)} compiled kernels, spills: {meta['spills']}; wrote {json_path} and {md_path}")
    for c in spilling:
        print(f"SPILLS: {json.dumps(c.row())}", file=sys.stderr)


if __name__ == "__main__":
    main()
