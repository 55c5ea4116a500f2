"""Compiling the ops: the Triton and C++ kernels are registered torch.library custom ops (opcheck passes,
torch.compile traces them), and every Triton kernel compiles for sm_80 and sm_90 on a machine without a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, assert_close_to_reference
from helpers import BACKENDS, backend_device, make_problem

from switchcit import build_routing_plan, lora_linear
from switchcit.ops import cpp

ROOT = Path(__file__).resolve().parents[2]


def test_opcheck(generator):
    p = make_problem(generator, 21, 32, 24, 3, 8, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 3, tiles=True)
    routing = (plan.sorted_token_ids, plan.adapter_offsets, plan.tile_adapter, plan.tile_start, plan.block_m)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    ops = torch.ops.switchcit
    partial = ops.lora_shrink(p.x, p.lora_a, *routing, p.ranks)
    torch.library.opcheck(ops.lora_shrink.default, (p.x, p.lora_a, *routing, p.ranks), test_utils=tests)
    out = torch.randn(21, 24, generator=generator).to(DEVICE)
    torch.library.opcheck(ops.lora_expand_.default, (out, partial, p.lora_b, *routing, p.scaling, 1.0, p.ranks),
                          test_utils=tests)
    grad_b = torch.empty_like(p.lora_b)
    torch.library.opcheck(ops.lora_weight_grad_.default, (grad_b, out, partial, *routing, p.scaling, 1.0, p.ranks),
                          test_utils=tests)


@pytest.mark.skipif(not cpp.HAS_CPP_KERNELS, reason="C++ core not built")
def test_cpp_opcheck(generator):
    """The C++ ops' schemas and fake implementations: the forward with a buffer for x·Aᵀ (training) and
    without (inference), the backward with every gradient or only some."""
    p = make_problem(generator, 21, 32, 24, 3, 8)
    plan = build_routing_plan(p.adapter_ids, 3)
    routing = (plan.sorted_token_ids, plan.adapter_offsets)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    shrunk = torch.zeros(21, 8)
    for saved, scaling, ranks in ((shrunk, p.scaling, p.ranks), (None, None, None)):
        torch.library.opcheck(cpp.cpp_lora_forward_.op, (torch.zeros(21, 24), saved, p.x, p.lora_a, p.lora_b,
                                                          *routing, scaling, 0.5, ranks), test_utils=tests)
    grad_out = torch.randn(21, 24, generator=generator)
    for needs in ((True, True, True), (False, True, False)):
        torch.library.opcheck(cpp.cpp_lora_backward.op, (grad_out, p.x, p.lora_a, p.lora_b, shrunk, *routing,
                                                          p.scaling, 1.0, p.ranks, *needs), test_utils=tests)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_torch_compile_fullgraph(backend, generator):
    p = make_problem(generator, 26, 40, 30, 4, 8, device=backend_device(backend, DEVICE))
    plan = build_routing_plan(p.adapter_ids, 4, tiles=True)

    def layer(x, weight, bias, lora_a, lora_b, scaling, ranks):
        return torch.relu(lora_linear(x, weight, lora_a, lora_b, plan, scaling, bias=bias, ranks=ranks,
                                      backend=backend))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, p.ranks)
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(got, torch.relu(base + p.reference_delta()), torch.float32)


def test_every_triton_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """benchmarks/kernel_resources.py --check records the launches of the Triton dispatch on meta tensors
    for every dtype and launch configuration it can choose and compiles each with
    ``triton.compile(..., target=GPUTarget("cuda", arch, 32))``: no GPU needed, only Triton's ptxas."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", "--check", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    rows = json.loads((tmp_path / "kernel-resources-check.json").read_text())["rows"]
    assert all(row["registers"] > 0 for row in rows)
    kernels = ("_lora_shrink_kernel", "_lora_expand_kernel", "_lora_weight_grad_kernel", "_pool_kernel",
               "_classify_kernel")
    compiled = {(row["kernel"], row["arch"], dtype) for row in rows for dtype in row["dtypes"]}
    for arch in ("sm_80", "sm_90"):
        assert {(kernel, arch, dtype) for kernel in kernels for dtype in ("float16", "bfloat16", "float32")} <= compiled
        expand = [row["constexprs"] for row in rows if row["arch"] == arch and row["kernel"] == "_lora_expand_kernel"]
        assert {c["BLOCK_M"] for c in expand} == {16, 64}, "16- and 64-row tiles"
        assert {c.get("num_splits") for c in expand} == {1, None}, "one shrink split (specialised) and several"
        assert {c["HAS_RANKS"] for c in expand} == {c["HAS_SCALING"] for c in expand} == {True, False}
        pool = [row["constexprs"] for row in rows if row["arch"] == arch and row["kernel"] == "_pool_kernel"]
        assert {c["POOL_LAST"] for c in pool} == {True, False}
