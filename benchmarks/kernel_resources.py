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
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compiled for GPUs: the interpreter would replace the kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import switchcit.kernels.lora as lora_kernels  # noqa: E402
import switchcit.kernels.switch as switch_kernels  # noqa: E402
from common import run_metadata, write_results  # noqa: E402
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
    dtype: torch.dtype  # of the workload's activations


@dataclass
class Workload:
    """Calls of the dispatch on meta tensors, the roles of the launches they make (in order), their dtype."""

    run: Callable[[], None]
    roles: tuple[str, ...]
    dtype: torch.dtype


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
               scaling_dtype: torch.dtype | None = torch.float32) -> Workload:
    """One layer's LoRA term through the Triton dispatch, forward and backward."""

    def run():
        x, grad_out = meta(tokens, hidden, dtype=dtype), meta(tokens, out_features, dtype=dtype)
        lora_a, lora_b = meta(ADAPTERS, rank, hidden, dtype=dtype), meta(ADAPTERS, out_features, rank, dtype=dtype)
        plan = build_routing_plan(meta(tokens, dtype=torch.int64), ADAPTERS, tiles=True)
        ranks = None if ranks_dtype is None else meta(ADAPTERS, dtype=ranks_dtype)
        scaling = None if scaling_dtype is None else meta(ADAPTERS, dtype=scaling_dtype)
        shrunk = TritonKernels.forward(meta(tokens, out_features, dtype=dtype), x, lora_a, lora_b, plan, scaling,
                                       1.0, ranks, save=True)
        TritonKernels.backward(grad_out, x, lora_a, lora_b, shrunk, plan, scaling, 1.0, ranks, (True, True, True))

    return Workload(run, FORWARD_ROLES + BACKWARD_ROLES, dtype)


def switch(dtype: torch.dtype, batch: int, seq_len: int, features: int, hidden_units: int, tasks: int,
           components: int, pool_last: bool) -> Workload:
    """The fused switch on one batch (float32 switch parameters, as ``switch_route`` passes them)."""

    def run():
        fp32 = torch.float32
        fused_switch_route(
            meta(batch, seq_len, features, dtype=dtype), meta(batch, seq_len, features, dtype=dtype),
            meta(batch, seq_len, dtype=torch.int64), meta(features, dtype=fp32), meta(features, dtype=fp32),
            meta(hidden_units, features, dtype=fp32), meta(hidden_units, dtype=fp32),
            meta(tasks, hidden_units, dtype=fp32), meta(tasks, dtype=fp32), meta(features, dtype=fp32),
            meta(features, dtype=fp32),
            meta(tasks, features, dtype=fp32), meta(components, features, dtype=fp32), 1.0, float("inf"), 0.0,
            meta(tasks, dtype=torch.int32), pool_last,
        )

    return Workload(run, SWITCH_ROLES, dtype)


def model_workloads() -> dict[str, Workload]:
    """bench_model's layer shapes at every token count, and the switch on a 16 × 512 prefill."""
    workloads = {f"{layer} T={tokens}": lora_layer(torch.bfloat16, tokens, *shape)
                 for layer, shape in MODEL_LAYERS.items() for tokens in MODEL_TOKENS}
    for pool in ("last", "mean"):
        workloads[f"switch 16×512 pool={pool}"] = switch(torch.bfloat16, 16, 512, 2048, 200, 8, 128, pool == "last")
    return workloads


def check_workloads() -> dict[str, Workload]:
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
    for pool in ("last", "mean"):  # the classifier's blocks follow the head's sizes; it reads float32 features
        workloads[f"float32 switch pool={pool}, small head"] = switch(torch.float32, 3, 7, 40, 24, 3, 9, pool == "last")
    return workloads


def record(workloads: dict[str, Workload], sm_count: int) -> list[Launch]:
    launches = []
    for name, workload in workloads.items():
        with recorded_launches(sm_count) as recorded:
            workload.run()
        assert len(recorded) == len(workload.roles), f"{name}: {len(recorded)} launches, expected {workload.roles}"
        launches += [Launch(kernel, args, kwargs, role, name, workload.dtype)
                     for (kernel, args, kwargs), role in zip(recorded, workload.roles)]
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
    """One distinct compiled kernel (a specialisation for one arch) and the launches that use it."""

    kernel: str
    arch: int
    constexprs: dict
    num_warps: int = 0
    resources: dict = field(default_factory=dict)
    dtypes: set = field(default_factory=set)  # of the activations of the workloads that use it
    roles: set = field(default_factory=set)
    workloads: list = field(default_factory=list)

    def row(self) -> dict:
        return {"kernel": self.kernel, "arch": f"sm_{self.arch}", "dtypes": sorted(self.dtypes),
                "constexprs": self.constexprs, "num_warps": self.num_warps, **self.resources,
                "roles": sorted(self.roles), "workloads": self.workloads}


_PENDING: list[tuple[int, ASTSource, dict]] = []  # what the worker processes compile, by index (forked)


def _compile(index: int) -> dict:
    arch, src, options = _PENDING[index]
    binary = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return {"num_warps": binary.metadata.num_warps, "resources": {**ptxas_report(binary.asm["ptx"], arch),
                                                                  "shared_bytes": binary.metadata.shared}}


def compile_all(workloads: dict[str, Workload], jobs: int) -> list[Compiled]:
    """Every distinct kernel the workloads launch, compiled for every arch (``jobs`` processes)."""
    compiled: dict[tuple, Compiled] = {}
    for arch, sm_count in SM_COUNT.items():
        for launch in record(workloads, sm_count):
            src, options = specialise(launch, arch)
            key = (arch, src.hash(), options["num_warps"], options["num_stages"])
            if key not in compiled:
                names = launch.kernel.arg_names
                constexprs = {names[index[0]]: value for index, value in src.constants.items()}
                compiled[key] = Compiled(launch.kernel.__name__, arch, constexprs)
                _PENDING.append((arch, src, options))
            compiled[key].dtypes.add(str(launch.dtype).removeprefix("torch."))
            compiled[key].roles.add(launch.role)
            compiled[key].workloads.append(launch.workload)
    # Forked workers read _PENDING as it is now; only indices and plain results cross processes.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        for entry, result in zip(compiled.values(), pool.map(_compile, range(len(_PENDING)))):
            entry.num_warps, entry.resources = result["num_warps"], result["resources"]
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


def table(compiled: list[Compiled]) -> list[list[str]]:
    """One row per kernel, dtypes and shown constexprs; the worst registers, spills and shared memory over
    its specialisations (the divisibility of its integer arguments) on each arch."""
    groups: dict[tuple, list[Compiled]] = {}
    for c in compiled:
        shown = " ".join(f"{k}={v}" for k, v in c.constexprs.items() if k in SHOWN)
        groups.setdefault((c.kernel, ", ".join(sorted(c.dtypes)), shown, c.num_warps), []).append(c)
    rows = []
    for (kernel, dtypes, shown, warps), members in sorted(groups.items()):
        row = [kernel, ", ".join(sorted(set().union(*(c.roles for c in members)))), dtypes, shown, str(warps)]
        for arch in SM_COUNT:
            on_arch = [c.resources for c in members if c.arch == arch]
            row += [str(max(r["registers"] for r in on_arch)),
                    f"{max(r['spill_stores'] for r in on_arch)}/{max(r['spill_loads'] for r in on_arch)}",
                    str(max(r["shared_bytes"] for r in on_arch))]
        rows.append(row + [workload_summary([w for c in members for w in c.workloads])])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="every dtype and launch configuration (the compile test)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="compiling processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    compiled = compile_all(check_workloads() if args.check else model_workloads(), args.jobs)
    spilling = [c for c in compiled if c.resources["spill_stores"] or c.resources["spill_loads"]]

    meta = run_metadata(torch.device("cpu"))
    meta["command"] = "python benchmarks/kernel_resources.py" + (" --check" if args.check else "")
    meta["targets"] = ", ".join(f"sm_{arch} ({count} SMs for split-K)" for arch, count in SM_COUNT.items())
    meta["ptxas"] = ", ".join(f"sm_{arch}: {get_ptxas(arch).version}" for arch in SM_COUNT)
    meta["spills"] = "none" if not spilling else f"{len(spilling)} of {len(compiled)} compiled kernels"
    header = ["kernel", "launches", "dtype", "constexprs", "warps"]
    header += [f"sm_{arch} {column}" for arch in SM_COUNT for column in ("registers", "spill st/ld (B)", "shared (B)")]
    header += ["workloads"]
    name = "kernel-resources-check" if args.check else "kernel-resources"
    title = "Triton kernel resources" + (": every dispatchable configuration" if args.check else ": model shapes")
    notes = ("Registers, spills and shared memory are the largest over the row's specialisations (the JSON lists "
             "each compiled kernel); the workloads are those whose launches use them; dtype: the workloads' "
             "activations. See the docstring of benchmarks/kernel_resources.py.")
    json_path, md_path = write_results(args.out, name, title, meta, [c.row() for c in compiled], header,
                                       table(compiled), notes)
    print(f"{len(compiled)} compiled kernels, spills: {meta['spills']}; wrote {json_path} and {md_path}")
    for c in spilling:
        print(f"SPILLS: {json.dumps(c.row())}", file=sys.stderr)


if __name__ == "__main__":
    main()
