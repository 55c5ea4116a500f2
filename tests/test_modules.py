"""MultiLoraLinear and RoutingContext: the adapter bank behind the Hugging Face integration."""
import pytest
import torch
from conftest import assert_close_to_reference

from switchcit import NO_ADAPTER, MultiLoraLinear, RoutingContext
from switchcit.ops.naive import lora_delta_reference


def bank_layer(gen, hidden=24, out_features=20):
    base = torch.nn.Linear(hidden, out_features)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, hidden, generator=gen) / hidden**0.5)
    return MultiLoraLinear(base)


def test_bank_routes_tokens_to_their_adapters(generator):
    layer = bank_layer(generator)
    weights = {}
    for name, rank, alpha in (("a", 4, 8.0), ("b", 8, 8.0), ("c", 2, 1.0)):
        lora_a, lora_b = torch.randn(rank, 24, generator=generator), torch.randn(20, rank, generator=generator)
        assert layer.add_adapter(name, lora_a, lora_b, alpha=alpha) == len(weights)
        weights[name] = (lora_a, lora_b, alpha / rank)
    assert layer.lora_a.shape == (3, 8, 24) and layer.ranks.tolist() == [4, 8, 2]

    x = torch.randn(2, 5, 24, generator=generator)
    layer.context.assign(layer.context.ids_of(["b", None]))  # one adapter per sequence
    layer.context.begin_forward(x.shape[:-1], x.device)  # what the model's embedding pre-hook does
    got = layer(x)
    expected = torch.nn.functional.linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double())
    lora_a, lora_b, scale = weights["b"]
    expected[0] += scale * (x[0].double() @ lora_a.double().T) @ lora_b.double().T
    assert_close_to_reference(got, expected, torch.float32)


def test_remove_and_replace_adapter(generator):
    layer = bank_layer(generator)
    layer.add_adapter("a", rank=4)
    layer.add_adapter("b", torch.randn(4, 24, generator=generator), torch.randn(20, 4, generator=generator))
    x = torch.randn(3, 24, generator=generator)
    base = layer.base_layer(x)
    layer.context.route_tokens(torch.tensor([0, 1, NO_ADAPTER]))
    assert torch.equal(layer(x)[0], base[0]), "fresh adapters start as a no-op (B = 0), like PEFT's"
    layer.remove_adapter("b")
    assert layer.adapter_names == ["a"]
    torch.testing.assert_close(layer(x), base)
    with pytest.raises(KeyError, match="no weights"):
        layer.adapter_weights("b")
    with pytest.raises(ValueError, match="expected lora_a"):
        layer.add_adapter("c", torch.randn(4, 23), torch.randn(20, 4))


def test_layers_share_context_and_plan(generator):
    context = RoutingContext()
    first, second = bank_layer(generator), bank_layer(generator, hidden=20, out_features=24)
    first.context = second.context = context
    first.add_adapter("a", torch.randn(2, 24, generator=generator), torch.randn(20, 2, generator=generator))
    second.add_adapter("b", torch.randn(3, 20, generator=generator), torch.randn(24, 3, generator=generator))
    context.assign(context.ids_of(["a", "b"]))
    x = torch.randn(2, 4, 24, generator=generator)
    context.begin_forward(x.shape[:-1], x.device)
    plan = context.plan
    y = second(first(x))  # `first` grows to the context's two adapters on its next forward
    assert first.lora_a.shape[0] == 2 and first.ranks.tolist() == [2, 0]
    assert context.plan is plan and plan.token_adapter.tolist() == [0] * 4 + [1] * 4, "one plan per forward"
    ids = torch.tensor([0] * 4 + [1] * 4)
    h = first.base_layer(x).reshape(8, 20) + lora_delta_reference(
        x.reshape(8, 24), first.lora_a, first.lora_b, ids, first.scaling, first.ranks)
    expected = second.base_layer(h) + lora_delta_reference(
        h, second.lora_a, second.lora_b, ids, second.scaling, second.ranks)
    torch.testing.assert_close(y.reshape(8, 24), expected, rtol=1e-5, atol=1e-5)


def test_training_a_bank_moves_only_routed_adapters(generator):
    layer = bank_layer(generator)
    for name in ("a", "b", "c"):
        layer.add_adapter(name, torch.randn(4, 24, generator=generator), torch.randn(20, 4, generator=generator))
    layer.context.assign(layer.context.ids_of(["a", "c", "a"]))
    layer.context.begin_forward((3, 6), torch.device("cpu"))
    before = layer.lora_a.detach().clone()
    optimizer = torch.optim.SGD([layer.lora_a, layer.lora_b], lr=0.1)
    layer(torch.randn(3, 6, 24, generator=generator)).square().mean().backward()
    optimizer.step()
    moved = (layer.lora_a.detach() != before).flatten(1).any(1).tolist()
    assert moved == [True, False, True]


def test_context_names_and_errors():
    context = RoutingContext(["a", "b"])
    assert context.id_of("b") == 1 and context.ids_of(["b", None]).tolist() == [1, NO_ADAPTER]
    with pytest.raises(KeyError, match="unknown adapter 'z'"):
        context.ids_of(["a", "z"])
    with pytest.raises(ValueError, match="non-empty string"):
        context.add("")
    with pytest.raises(TypeError, match="int32 or int64"):
        context.assign(torch.tensor([0.0]))
    context.remove("a")
    assert context.add("c") == 2, "ids are never reused"
    context.assign(torch.tensor([1, NO_ADAPTER]))
    with pytest.raises(ValueError, match="do not fit"):
        context.begin_forward((3, 4), torch.device("cpu"))
    context.begin_forward((4, 5), torch.device("cpu"))  # beam search: 2 × the assigned sequences
    assert context.plan.token_adapter.tolist() == [1] * 10 + [NO_ADAPTER] * 10
    context.assign(None)
    context.begin_forward((4, 5), torch.device("cpu"))
    assert context.plan is None, "nothing assigned: every token on the base model"
