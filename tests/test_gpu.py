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


def test_switch_routing_and_forward_in_one_cuda_graph(generator, tmp_path):
    """Prompt features → fused switch kernel → routing plan → adapter-bank forward, captured as one CUDA
    graph; replaying it on other prompts routes them anew and equals the eager forward."""
    pytest.importorskip("peft")
    from test_hf import tiny_llama, with_adapters

    from switchcit import load_adapters
    from switchcit.switch import Switch, SwitchModel

    with_adapters(tiny_llama(), [("a", 4, 8, ["q_proj", "v_proj"]), ("b", 4, 8, ["q_proj", "v_proj"])]).save_pretrained(tmp_path)
    model = load_adapters(tiny_llama(), {t: tmp_path / t for t in ("a", "b")}).cuda().eval()
    vocab = model.config.vocab_size
    # Two "tasks" of prompts: token ids from two far-apart ranges of the vocabulary.
    def prompts(task, count, length=12):
        low = 4 if task == "a" else vocab - 20
        return torch.randint(low, low + 16, (count, length), generator=generator).cuda()

    with torch.no_grad():
        train = torch.cat([prompts("a", 24), prompts("b", 24)])
        mask = torch.ones_like(train)
        embeddings = model.get_input_embeddings()(train)
        last = model(input_ids=train, output_hidden_states=True).hidden_states[-1][:, -1]
        switch = Switch.fit(last.float().cpu(), embeddings.mean(1).float().cpu(), ["a"] * 24 + ["b"] * 24, epochs=40)
    switchcit_model = SwitchModel(model, tokenizer=_NoTokenizer(), switch=switch)

    input_ids = torch.cat([prompts("a", 3), prompts("b", 3)])
    mask = torch.ones_like(input_ids)

    def forward():
        sequence_ids, _ = switchcit_model.route_ids(input_ids, mask)
        switchcit_model.context.route(sequence_ids)
        return model(input_ids=input_ids).logits

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = forward()
        input_ids.copy_(torch.cat([prompts("b", 3), prompts("a", 3)]))
        graph.replay()
        expected = forward()
        ids, _ = switchcit_model.route_ids(input_ids, mask)
    assert ids.tolist() == [1, 1, 1, 0, 0, 0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


class _NoTokenizer:
    pad_token = "<pad>"
