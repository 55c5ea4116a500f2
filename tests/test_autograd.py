"""Training through the op: gradients of x, lora_a, lora_b (and the base weight) against the reference."""
import pytest
import torch
from conftest import DEVICE, assert_close_to_reference
from helpers import make_problem

from switchcit import build_routing_plan, lora_delta, lora_linear
from switchcit.ops.naive import lora_delta_reference


def kernel_backends():
    """Backends with their own backward kernels that can run here."""
    from switchcit.ops import routing

    backends = ["triton"]
    if DEVICE.type == "cpu" and routing._C is not None and hasattr(routing._C, "lora_forward"):
        backends.append("cpp")
    return backends


def reference_grads(p, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (p.x, p.lora_a, p.lora_b)]
    scaling = p.scaling.double() if isinstance(p.scaling, torch.Tensor) else p.scaling
    delta = lora_delta_reference(*leaves, p.adapter_ids, scaling, p.ranks)
    if not delta.requires_grad:  # no token has an adapter: nothing depends on the inputs
        return [torch.zeros_like(t) for t in leaves]
    delta.backward(grad_out.double())
    return [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def test_reference_gradcheck(generator):
    p = make_problem(generator, 11, 7, 5, 3, 4, dtype=torch.float64)
    x, a, b = (t.requires_grad_() for t in (p.x, p.lora_a, p.lora_b))
    assert torch.autograd.gradcheck(
        lambda x, a, b: lora_delta_reference(x, a, b, p.adapter_ids, p.scaling, p.ranks), (x, a, b)
    )


CASES = [(37, 70, 53, 5, 12, "random"), (1, 24, 40, 3, 8, "random"), (70, 33, 18, 5, 16, "skip_some"),
         (20, 16, 16, 2, 4, "all_base"), (140, 40, 24, 3, 8, "one_adapter")]


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-H{}-O{}-N{}-R{}-{}".format(*c))
def test_backward_matches_reference(backend, case, generator):
    tokens, hidden, out_features, num_adapters, max_rank, ids = case
    p = make_problem(generator, tokens, hidden, out_features, num_adapters, max_rank, ids=ids, device=DEVICE)
    grad_out = torch.randn(tokens, out_features, generator=generator).to(DEVICE)
    expected = reference_grads(p, grad_out)

    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b)]
    poison = [torch.randn(t.shape, generator=generator).to(DEVICE) for t in leaves]
    for leaf, old in zip(leaves, poison):
        leaf.grad = old.clone()  # gradients must accumulate into what is there
    delta = lora_delta(*leaves, p.adapter_ids, p.scaling, ranks=p.ranks, backend=backend)
    assert_close_to_reference(delta, p.reference_delta(), torch.float32)
    delta.backward(grad_out)
    for name, leaf, old, want in zip(("x", "lora_a", "lora_b"), leaves, poison, expected):
        assert_close_to_reference(leaf.grad, old.double() + want, torch.float32), name


@pytest.mark.parametrize("backend", kernel_backends())
def test_only_some_inputs_need_grad(backend, generator):
    p = make_problem(generator, 30, 20, 24, 3, 8, device=DEVICE)
    grad_out = torch.randn(30, 24, generator=generator).to(DEVICE)
    _, _, want_b = reference_grads(p, grad_out)
    lora_b = p.lora_b.clone().requires_grad_()
    lora_delta(p.x, p.lora_a, lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend=backend).backward(grad_out)
    assert_close_to_reference(lora_b.grad, want_b, torch.float32)


@pytest.mark.parametrize("backend", kernel_backends())
def test_no_cross_talk_between_adapters(backend, generator):
    """In a mixed batch, adapter j's gradient equals the gradient from j's tokens alone."""
    p = make_problem(generator, 48, 32, 20, 4, 8, device=DEVICE, heterogeneous_ranks=False)
    grad_out = torch.randn(48, 20, generator=generator).to(DEVICE)
    a, b = p.lora_a.clone().requires_grad_(), p.lora_b.clone().requires_grad_()
    lora_delta(p.x, a, b, p.adapter_ids, p.scaling, backend=backend).backward(grad_out)
    for j in range(4):
        mine = p.adapter_ids == j
        a_j, b_j = p.lora_a.clone().requires_grad_(), p.lora_b.clone().requires_grad_()
        ids_j = p.adapter_ids[mine]
        lora_delta(p.x[mine], a_j, b_j, ids_j, p.scaling, backend=backend).backward(grad_out[mine])
        torch.testing.assert_close(a.grad[j], a_j.grad[j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad[j], b_j.grad[j], rtol=1e-5, atol=1e-5)
        others = [k for k in range(4) if k != j]
        assert torch.equal(a_j.grad[others], torch.zeros_like(a_j.grad[others]))


@pytest.mark.parametrize("backend", kernel_backends())
def test_optimizer_step_trains_several_adapters_in_one_batch(backend, generator):
    """One AdamW step of a tiny two-layer model, three tasks in one batch, equals the reference's step."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    tokens, hidden, num_adapters, rank = 40, 24, 3, 4
    ids = torch.randint(0, num_adapters, (tokens,), generator=generator).to(DEVICE)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE)
    target = torch.randn(tokens, hidden, generator=generator).to(DEVICE)
    base = [torch.randn(hidden, hidden, generator=generator).to(DEVICE) / hidden**0.5 for _ in range(2)]

    def new_bank():
        gen = torch.Generator().manual_seed(7)
        return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(DEVICE) * 0.1)
                for _ in range(2) for shape in ((num_adapters, rank, hidden), (num_adapters, hidden, rank))]

    def train_step(backend_name):
        bank = new_bank()
        optimizer = torch.optim.AdamW(bank, lr=1e-2)
        plan = build_routing_plan(ids, num_adapters)  # once per forward, both layers use it
        h = torch.relu(lora_linear(x, base[0], bank[0], bank[1], plan, 2.0, backend=backend_name))
        y = lora_linear(h, base[1], bank[2], bank[3], plan, 2.0, backend=backend_name)
        loss = torch.nn.functional.mse_loss(y, target)
        loss.backward()
        optimizer.step()
        return loss.item(), [t.detach() for t in bank]

    loss, trained = train_step(backend)
    ref_loss, ref_trained = train_step("torch")
    assert abs(loss - ref_loss) < 1e-5 * (1 + abs(ref_loss))
    start = new_bank()
    for got, want, before in zip(trained, ref_trained, start):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.equal(got, before.detach()), "every adapter had tokens, so every adapter moved"


def test_base_weight_grad_flows_through_linear(generator):
    p = make_problem(generator, 19, 16, 12, 3, 4, device=DEVICE)
    weight = p.weight.clone().requires_grad_()
    grad_out = torch.randn(19, 12, generator=generator).to(DEVICE)
    lora_linear(p.x, weight, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend="triton").backward(grad_out)
    torch.testing.assert_close(weight.grad, grad_out.T @ p.x, rtol=1e-5, atol=1e-5)
