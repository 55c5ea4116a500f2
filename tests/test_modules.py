"""MultiLoraLinear and RoutingContext: the adapter bank behind the Hugging Face integration."""
import pytest
import torch
from conftest import assert_close_to_reference

from switchcit import NO_ADAPTER, MultiLoraLinear, RoutingContext
from switchcit.modules import accelerate_linear, restore_linear
from switchcit.ops import lora as lora_module
from switchcit.ops.cpp import HAS_CPP_KERNELS, HAS_CPP_LINEAR
from switchcit.ops.naive import lora_delta_reference

prepare = lora_module._prepare


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


@pytest.mark.skipif(not HAS_CPP_KERNELS, reason="switchcit._C is not built")
def test_inference_with_the_context_plan_skips_the_per_call_checks_not_their_errors(generator, monkeypatch):
    layer = bank_layer(generator)
    for name, rank in (("a", 3), ("b", 6)):
        layer.add_adapter(name, torch.randn(rank, 24, generator=generator), torch.randn(20, rank, generator=generator))
    ids = torch.tensor([1, NO_ADAPTER, 0, 1, 1, 0, NO_ADAPTER])  # ragged: adapter a 2 tokens, b 3, base 2
    x = torch.randn(1, 7, 24, generator=generator)
    layer.context.route_tokens(ids)
    checked = []
    monkeypatch.setattr(lora_module, "_prepare", lambda *args: checked.append(1) or prepare(*args))
    with torch.no_grad():
        got = layer(x)
    assert not checked  # the kernel, without lora_delta's checks
    expected = torch.nn.functional.linear(x.double(), layer.base_layer.weight.double(), layer.base_layer.bias.double())
    expected[0] += lora_delta_reference(x[0].double(), layer.lora_a.double(), layer.lora_b.double(), ids,
                                        layer.scaling.double(), layer.ranks)
    assert_close_to_reference(got, expected, torch.float32)
    with torch.no_grad(), pytest.raises(ValueError, match="routing plan is for 7 tokens"):
        layer(x[:, :5])  # a plan for other tokens: lora_delta's own error
    assert checked
    got_with_grad = layer(x)  # grad mode: lora_delta, differentiable
    assert got_with_grad.requires_grad
    assert_close_to_reference(got_with_grad.detach(), expected, torch.float32)


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


def kernel_calls(monkeypatch) -> list:
    """Counts the calls :func:`switchcit.ops.linear` makes to the C++ kernel (one entry per call)."""
    import switchcit.ops.dense as dense

    calls, kernel = [], dense.cpp_linear
    monkeypatch.setattr(dense, "cpp_linear", lambda *args: calls.append(args[0].shape) or kernel(*args))
    return calls


@pytest.mark.skipif(not HAS_CPP_LINEAR, reason="C++ core not built")
def test_accelerate_linear_serves_bank_base_layers_with_the_kernel(generator, monkeypatch):
    """A bank layer's base GEMM goes through the kernel with grad mode off (results as before, within
    rounding), through F.linear (bitwise as before, gradients included) with it on; restore undoes it."""
    layer = bank_layer(generator)
    layer.add_adapter("a", torch.randn(4, 24, generator=generator), torch.randn(20, 4, generator=generator))
    model = torch.nn.Sequential(layer, torch.nn.Linear(20, 9))
    x = torch.randn(3, 5, 24, generator=generator)
    layer.context.assign(layer.context.ids_of(["a", None, "a"]))
    layer.context.begin_forward(x.shape[:-1], x.device)
    with torch.no_grad():
        expected = model(x)
    trained = x.clone().requires_grad_()
    trained_out = model(trained)
    trained_out.sum().backward()

    calls = kernel_calls(monkeypatch)
    assert accelerate_linear(accelerate_linear(model)) is model
    forward = layer.base_layer.forward
    accelerate_linear(model)
    assert layer.base_layer.forward == forward, "idempotent: the same forward, not one wrapped twice"
    with torch.no_grad():
        got = model(x)
    assert calls == [(3, 5, 24), (3, 5, 20)], "both linear layers"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    calls.clear()
    again = x.clone().requires_grad_()
    out = model(again)
    out.sum().backward()
    assert calls == [], "grad mode: F.linear"
    assert torch.equal(out, trained_out) and torch.equal(again.grad, trained.grad)

    restore_linear(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert calls == []


def test_accelerate_linear_leaves_other_forwards_alone():
    """Subclasses with their own forward and layers whose forward someone else replaced keep theirs."""

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    replaced = torch.nn.Linear(4, 4)
    replaced.forward = lambda x: x
    model = torch.nn.Sequential(Scaled(4, 4), replaced, torch.nn.Linear(4, 3))
    accelerate_linear(model)
    assert "forward" not in model[0].__dict__
    assert model[1].forward(torch.ones(1, 4)).tolist() == [[1.0] * 4]
    assert "forward" in model[2].__dict__
    restore_linear(model)
    assert "forward" in model[1].__dict__ and "forward" not in model[2].__dict__
