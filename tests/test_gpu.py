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


def test_routed_prefill_in_one_cuda_graph(generator, tmp_path):
    """The pipeline's routed prefill — base layers below K, the fused switch kernel at layer K, the plan,
    the adapter-bank layers — captured as one CUDA graph with sync debug mode on (any host sync
    raises); replaying it on other prompts routes them anew and equals the eager forward."""
    pytest.importorskip("peft")
    from test_hf import tiny_llama, with_adapters

    from switchcit import Switch, SwitchModel, load_adapters

    with_adapters(tiny_llama(), [("a", 4, 8, ["q_proj", "v_proj"]),
                                 ("b", 4, 8, ["q_proj", "v_proj"])]).save_pretrained(tmp_path)
    model = load_adapters(tiny_llama(), {t: tmp_path / t for t in ("a", "b")}).cuda().eval()
    vocab = model.config.vocab_size

    def prompts(task, count, length=12):  # two "tasks": token ids from two far-apart ranges of the vocabulary
        low = 4 if task == "a" else vocab - 20
        return torch.randint(low, low + 16, (count, length), generator=generator).cuda()

    with torch.no_grad():
        train = torch.cat([prompts("a", 24), prompts("b", 24)])
        embeddings = model.get_input_embeddings()(train).mean(1).float().cpu()
        switch = Switch.fit(embeddings, embeddings, ["a"] * 24 + ["b"] * 24, layer=0)
    pipeline = SwitchModel(model, tokenizer=_NoTokenizer(), switch=switch)

    input_ids = torch.cat([prompts("a", 3), prompts("b", 3)])
    mask = torch.ones_like(input_ids)
    adapters = torch.full((6,), -1, device="cuda")
    routed = torch.ones(6, dtype=torch.bool, device="cuda")

    def forward():
        return pipeline.routed_forward(input_ids, mask, mask, adapters, routed, use_cache=False)

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = forward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        input_ids.copy_(torch.cat([prompts("b", 3), prompts("a", 3)]))
        graph.replay()
        assert pipeline.context.sequence_ids.tolist() == [1, 1, 1, 0, 0, 0]
        expected = forward()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


class _NoTokenizer:
    pad_token = "<pad>"
