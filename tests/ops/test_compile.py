"""The Triton op is a registered torch.library custom op: opcheck passes and torch.compile traces it."""
import torch
from conftest import DEVICE, assert_close_to_reference
from helpers import make_problem

from switchcit import build_routing_plan, lora_linear


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


def test_torch_compile_fullgraph(generator):
    p = make_problem(generator, 26, 40, 30, 4, 8, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 4, tiles=True)

    def layer(x, weight, bias, lora_a, lora_b, scaling, ranks):
        return torch.relu(lora_linear(x, weight, lora_a, lora_b, plan, scaling, bias=bias, ranks=ranks,
                                      backend="triton"))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, p.ranks)
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(got, torch.relu(base + p.reference_delta()), torch.float32)
