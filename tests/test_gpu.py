"""CUDA-only checks: bf16 on the compiled kernels, CUDA-graph capture of plan + layer, no host sync."""
import pytest
import torch
from conftest import assert_close_to_reference
from helpers import make_problem

from switchcit import build_routing_plan, lora_linear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("tokens", [1, 16, 300, 4100])
def test_bf16_realistic_shapes(tokens, generator):
    p = make_problem(generator, tokens, 1024, 1536, 16, 16, dtype=torch.bfloat16, device="cuda")
    got = lora_linear(p.x, p.weight, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, bias=p.bias, ranks=p.ranks)
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(got, base + p.reference_delta(), torch.bfloat16)


def test_plan_and_layer_capture_in_cuda_graph_without_sync(generator):
    p = make_problem(generator, 96, 256, 384, 8, 16, dtype=torch.bfloat16, device="cuda")
    ids = p.adapter_ids.clone()

    def forward():
        plan = build_routing_plan(ids, 8)  # once per forward; no host sync when capturing
        return lora_linear(p.x, p.weight, p.lora_a, p.lora_b, plan, p.scaling, bias=p.bias, ranks=p.ranks)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()  # warm-up compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.set_sync_debug_mode("error")
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    ids.copy_(torch.randint(-1, 8, ids.shape, device="cuda"))  # new routing, same graph
    graph.replay()
    p.adapter_ids = ids
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(out, base + p.reference_delta(), torch.bfloat16)
