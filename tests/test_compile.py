"""The Triton op is a registered torch.library custom op: opcheck passes and torch.compile traces it."""
import torch
from conftest import DEVICE, assert_close_to_reference
from helpers import make_problem

from switchcit import build_routing_plan, lora_linear


def op_args(p, plan, out):
    return (out, p.x, p.lora_a, p.lora_b, plan.sorted_token_ids, plan.adapter_offsets, plan.tile_adapter,
            plan.tile_start, plan.block_m, p.scaling, 1.0, p.ranks)


def test_opcheck(generator):
    p = make_problem(generator, 21, 32, 24, 3, 8, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 3)
    out = torch.randn(21, 24, generator=generator).to(DEVICE)
    torch.library.opcheck(
        torch.ops.switchcit.segmented_lora_delta_.default, op_args(p, plan, out),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_torch_compile_fullgraph(generator):
    p = make_problem(generator, 26, 40, 30, 4, 8, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 4)

    def layer(x, weight, bias, lora_a, lora_b, scaling, ranks):
        return torch.relu(lora_linear(x, weight, lora_a, lora_b, plan, scaling, bias=bias, ranks=ranks, backend="triton"))

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = compiled(p.x, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, p.ranks)
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(got, torch.relu(base + p.reference_delta()), torch.float32)
