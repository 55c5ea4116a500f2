"""The multi-LoRA op (``lora_linear`` / ``lora_delta``) on every backend against the float64 reference:
forward, backward, input checks; then the Triton and C++ kernels called directly.

Outputs and gradients start poisoned with random values, so rows that must stay untouched are checked
bitwise and rows that must be written cannot pass by starting at zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, assert_close_to_reference
from helpers import BACKEND_DTYPES, BACKENDS, Problem, backend_device, make_problem
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

import switchcit.kernels
from switchcit import build_routing_plan, lora_delta, lora_linear
from switchcit.kernels import LoraKernelConfig, lora_expand, lora_shrink
from switchcit.ops import cpp, routing, select_backend
from switchcit.ops.naive import lora_delta_reference, lora_linear_reference
from switchcit.ops.routing import RoutingPlan

KERNEL_BACKENDS = tuple(b for b in BACKENDS if b != "torch")  # backends with their own backward kernels
BACKEND_AND_DTYPE = [(backend, dtype) for backend, dtypes in BACKEND_DTYPES.items() for dtype in dtypes]

# (T, H, O, N, R, ids): ragged sizes that are no multiple of any block, tile or vector width, and the edge cases.
CASES = [
    (37, 70, 53, 5, 12, "random"),
    (1, 33, 17, 3, 8, "random"),
    (0, 40, 24, 3, 8, "random"),
    (130, 48, 40, 4, 16, "skip_some"),  # adapters 1 and 3 get no tokens; T > 128 takes 64-row tiles
    (29, 24, 31, 4, 8, "all_base"),
    (45, 36, 20, 6, 20, "one_adapter"),
    (140, 40, 24, 3, 8, "one_adapter"),
    (19, 100, 96, 2, 64, "random"),
]


def case_id(case):
    return "T{}-H{}-O{}-N{}-R{}-{}".format(*case)


def backend_dtype_id(param):
    return f"{param[0]}-{str(param[1]).removeprefix('torch.')}" if isinstance(param, tuple) else None


def poison(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen).to(dtype).to(device)


def problem(gen, case, backend, dtype=torch.float32, **kwargs) -> Problem:
    tokens, hidden, out_features, num_adapters, max_rank, ids = case
    return make_problem(gen, tokens, hidden, out_features, num_adapters, max_rank, ids=ids, dtype=dtype,
                        device=backend_device(backend, DEVICE), **kwargs)


# --------------------------------------------------------------------------------------------------
# The reference


def test_reference_matches_per_token_formula(generator):
    p = make_problem(generator, 23, 9, 7, 4, 5, dtype=torch.float64)
    got = lora_delta_reference(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, p.ranks)
    for t in range(p.x.shape[0]):
        a = int(p.adapter_ids[t])
        if a < 0:
            assert torch.equal(got[t], torch.zeros_like(got[t]))
            continue
        r = int(p.ranks[a])
        expected = p.scaling[a] * sum(
            (p.x[t] @ p.lora_a[a, k]) * p.lora_b[a, :, k] for k in range(r)
        ) if r else torch.zeros_like(got[t])
        torch.testing.assert_close(got[t], expected, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck(generator):
    p = make_problem(generator, 11, 7, 5, 3, 4, dtype=torch.float64)
    x, a, b = (t.requires_grad_() for t in (p.x, p.lora_a, p.lora_b))
    assert torch.autograd.gradcheck(
        lambda x, a, b: lora_delta_reference(x, a, b, p.adapter_ids, p.scaling, p.ranks), (x, a, b)
    )


# --------------------------------------------------------------------------------------------------
# Forward on every backend


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend_dtype", BACKEND_AND_DTYPE, ids=backend_dtype_id)
def test_lora_delta_adds_into_out(case, backend_dtype, generator):
    backend, dtype = backend_dtype
    p = problem(generator, case, backend, dtype)
    out = poison(generator, case[0], case[2], dtype=dtype, device=p.x.device)
    before = out.clone()
    result = lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=out, ranks=p.ranks, backend=backend)
    assert result is out
    assert_close_to_reference(out, before.double() + p.reference_delta(), dtype)
    base_rows = p.adapter_ids == -1
    assert torch.equal(out[base_rows], before[base_rows]), "base-only tokens must be left untouched"


@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
@pytest.mark.parametrize("backend_dtype", BACKEND_AND_DTYPE, ids=backend_dtype_id)
def test_lora_linear(case, backend_dtype, generator):
    backend, dtype = backend_dtype
    p = problem(generator, case, backend, dtype)
    got = lora_linear(p.x, p.weight, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, bias=p.bias, ranks=p.ranks,
                      backend=backend)
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(got, base + p.reference_delta(), dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("tensor_scaling", [True, False], ids=["tensor-scaling", "float-scaling"])
@pytest.mark.parametrize("ranks", [True, False], ids=["ranks", "full-rank"])
def test_id_dtypes_scalings_and_ranks(backend, id_dtype, tensor_scaling, ranks, generator):
    p = problem(generator, (41, 50, 27, 5, 12, "random"), backend, id_dtype=id_dtype, tensor_scaling=tensor_scaling,
                heterogeneous_ranks=ranks)
    got = lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend=backend)
    assert_close_to_reference(got, p.reference_delta(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_leading_dims(backend, generator):
    p = problem(generator, (24, 40, 36, 4, 8, "random"), backend)
    x = p.x.reshape(2, 12, 40).transpose(0, 1)  # [12, 2, H], non-contiguous
    ids = p.adapter_ids.reshape(2, 12).transpose(0, 1)  # one id per token of x, same layout
    lora_a = p.lora_a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    lora_b = torch.cat([p.lora_b, p.lora_b], dim=1)[:, ::2]  # [N, O, R] strided view
    assert not (x.is_contiguous() or lora_a.is_contiguous() or lora_b.is_contiguous())
    out = poison(generator, 36, 2, 12, device=x.device).permute(2, 1, 0)  # [12, 2, O], no 2-D view
    before = out.clone()
    lora_delta(x, lora_a, lora_b, ids, p.scaling, out=out, ranks=p.ranks, backend=backend)

    expected = lora_delta_reference(x.reshape(-1, 40).double(), lora_a.double(), lora_b.double(), ids.reshape(-1),
                                    p.scaling.double(), p.ranks)
    assert_close_to_reference(out, before.double() + expected.reshape(12, 2, 36), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_reused_across_layers(backend, generator):
    """One plan per forward serves every layer, whatever its shapes."""
    p = problem(generator, (33, 24, 40, 3, 8, "random"), backend)
    plan = build_routing_plan(p.adapter_ids, 3)
    hidden = lora_linear(p.x, p.weight, p.lora_a, p.lora_b, plan, p.scaling, bias=p.bias, ranks=p.ranks,
                         backend=backend)
    q = problem(generator, (33, 40, 24, 3, 8, "random"), backend)
    got = lora_delta(hidden, q.lora_a, q.lora_b, plan, q.scaling, ranks=q.ranks, backend=backend)
    expected = lora_delta_reference(hidden.double(), q.lora_a.double(), q.lora_b.double(), p.adapter_ids,
                                    q.scaling.double(), q.ranks)
    assert_close_to_reference(got, expected, torch.float32)


# --------------------------------------------------------------------------------------------------
# Backward on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(backend, case, generator):
    p = problem(generator, case, backend)
    device = p.x.device
    grad_out = poison(generator, case[0], case[2], device=device)
    expected = p.reference_grads(grad_out)

    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b)]
    old_grads = [poison(generator, *t.shape, device=device) for t in leaves]
    for leaf, old in zip(leaves, old_grads):
        leaf.grad = old.clone()  # gradients must accumulate into what is there
    delta = lora_delta(*leaves, p.adapter_ids, p.scaling, ranks=p.ranks, backend=backend)
    assert_close_to_reference(delta, p.reference_delta(), torch.float32)
    delta.backward(grad_out)
    for name, leaf, old, want in zip(("x", "lora_a", "lora_b"), leaves, old_grads, expected):
        assert_close_to_reference(leaf.grad, old.double() + want, torch.float32), name


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_only_some_inputs_need_grad(backend, generator):
    p = problem(generator, (30, 20, 24, 3, 8, "random"), backend)
    grad_out = poison(generator, 30, 24, device=p.x.device)
    _, _, want_b = p.reference_grads(grad_out)
    lora_b = p.lora_b.clone().requires_grad_()
    lora_delta(p.x, p.lora_a, lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend=backend).backward(grad_out)
    assert_close_to_reference(lora_b.grad, want_b, torch.float32)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_cross_talk_between_adapters(backend, generator):
    """In a mixed batch, adapter j's gradient equals the gradient from j's tokens alone."""
    p = problem(generator, (48, 32, 20, 4, 8, "random"), backend, heterogeneous_ranks=False)
    grad_out = poison(generator, 48, 20, device=p.x.device)
    a, b = p.lora_a.clone().requires_grad_(), p.lora_b.clone().requires_grad_()
    lora_delta(p.x, a, b, p.adapter_ids, p.scaling, backend=backend).backward(grad_out)
    for j in range(4):
        mine = p.adapter_ids == j
        a_j, b_j = p.lora_a.clone().requires_grad_(), p.lora_b.clone().requires_grad_()
        lora_delta(p.x[mine], a_j, b_j, p.adapter_ids[mine], p.scaling, backend=backend).backward(grad_out[mine])
        torch.testing.assert_close(a.grad[j], a_j.grad[j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad[j], b_j.grad[j], rtol=1e-5, atol=1e-5)
        others = [k for k in range(4) if k != j]
        assert torch.equal(a_j.grad[others], torch.zeros_like(a_j.grad[others]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_optimizer_step_trains_several_adapters_in_one_batch(backend, generator):
    """One AdamW step of a tiny two-layer model, three tasks in one batch, equals the reference's step."""
    device = backend_device(backend, DEVICE)
    tokens, hidden, num_adapters, rank = 40, 24, 3, 4
    ids = torch.randint(0, num_adapters, (tokens,), generator=generator).to(device)
    x = poison(generator, tokens, hidden, device=device)
    target = poison(generator, tokens, hidden, device=device)
    base = [poison(generator, hidden, hidden, device=device) / hidden**0.5 for _ in range(2)]
    bank_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))

    def new_bank():
        gen = torch.Generator().manual_seed(bank_seed)
        return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(device) * 0.1)
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
    grad_out = poison(generator, 19, 12, device=DEVICE)
    lora_linear(p.x, weight, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks,
                backend="triton").backward(grad_out)
    torch.testing.assert_close(weight.grad, grad_out.T @ p.x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routing", ["all_base", "rank_0_only", "no_adapters"])
def test_no_routed_token_gives_zero_gradients(backend, routing, generator):
    """No token reaches an adapter of rank > 0: every input that needs a gradient gets zeros (not none,
    and backward does not raise), as in ``lora_linear(...).sum().backward()`` with only A and B trained."""
    num_adapters = 0 if routing == "no_adapters" else 3
    p = problem(generator, (6, 8, 5, num_adapters, 4, "all_base"), backend)
    if routing == "rank_0_only":
        p.ranks[:] = torch.tensor([0, 2, 0])
        p.adapter_ids[::2] = 2
    lora_a, lora_b = p.lora_a.requires_grad_(), p.lora_b.requires_grad_()
    out = lora_linear(p.x, p.weight, lora_a, lora_b, p.adapter_ids, 2.0, ranks=p.ranks, backend=backend)
    out.sum().backward()
    for name, leaf in (("lora_a", lora_a), ("lora_b", lora_b)):
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf)), name

    x = p.x.requires_grad_()
    delta = lora_delta(x, p.lora_a.detach(), p.lora_b.detach(), p.adapter_ids, 2.0, ranks=p.ranks, backend=backend)
    delta.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", [(0, 6, 5, 3, 4), (7, 0, 5, 3, 4), (7, 6, 0, 3, 4), (7, 6, 5, 0, 4), (7, 6, 5, 3, 0)],
                         ids=lambda dims: "T{}-H{}-O{}-N{}-R{}".format(*dims))
def test_empty_dimensions(backend, dims, generator):
    """A size 0 anywhere (T, H, O, N or R) is a valid call: the LoRA term is an empty sum, zero, and so are
    its gradients; outputs keep their shapes."""
    tokens, hidden, out_features, num_adapters, max_rank = dims
    p = make_problem(generator, *dims, device=backend_device(backend, DEVICE))
    out = poison(generator, tokens, out_features, device=p.x.device)
    before = out.clone()
    lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=out, ranks=p.ranks, backend=backend)
    assert torch.equal(out, before)
    got = lora_linear(p.x, p.weight, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, bias=p.bias, ranks=p.ranks,
                      backend=backend)
    assert torch.equal(got, torch.nn.functional.linear(p.x, p.weight, p.bias))

    leaves = [t.detach().requires_grad_() for t in (p.x, p.lora_a, p.lora_b)]
    lora_delta(*leaves, p.adapter_ids, p.scaling, ranks=p.ranks, backend=backend).backward(out)
    for name, leaf in zip(("x", "lora_a", "lora_b"), leaves):
        assert leaf.grad is not None and torch.equal(leaf.grad, torch.zeros_like(leaf)), name


# --------------------------------------------------------------------------------------------------
# Property test (hypothesis): any sizes (0 included), ranks, ids, dtypes, layouts and routing, on every
# backend, forward and every gradient against the float64 reference


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout: contiguous, every other element of a wider buffer, or
    the last two dimensions stored transposed."""
    if layout == "strided":
        return torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]  # the gaps hold NaN
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


LAYOUTS = st.sampled_from(["contiguous", "strided", "transposed"])


@st.composite
def lora_calls(draw) -> dict:
    backend = draw(st.sampled_from(BACKENDS))
    # Up to two leading dimensions; one long one reaches the 64-row tiles (T > 128).
    lead = list(draw(st.lists(st.integers(1, 12), min_size=1, max_size=2) | st.tuples(st.integers(1, 150))))
    sizes = dict(hidden=draw(st.integers(1, 48)), out_features=draw(st.integers(1, 40)),
                 num_adapters=draw(st.integers(1, 5)), max_rank=draw(st.integers(1, 12)))
    # Sizes start at 1 and one call in two sets one of them to 0: left alone, hypothesis draws a size
    # of 0 so often that few calls would route any token through an adapter.
    empty = draw(st.sampled_from([None] * 5 + ["tokens", *sizes]))
    if empty == "tokens":
        lead[-1] = 0
    elif empty is not None:
        sizes[empty] = 0
    return dict(
        backend=backend,
        dtype=draw(st.sampled_from(BACKEND_DTYPES[backend])),
        lead=lead,
        **sizes,
        ids=draw(st.sampled_from(["random", "all_base", "one_adapter", "skip_some"])),
        id_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        tensor_scaling=draw(st.booleans()),
        heterogeneous_ranks=draw(st.booleans()),
        layouts=draw(st.tuples(LAYOUTS, LAYOUTS, LAYOUTS)),  # x, lora_a, lora_b
        routing=draw(st.sampled_from(["ids", "flat ids", "plan"])),
        call=draw(st.sampled_from(["lora_delta", "lora_delta into out", "lora_linear"])),
        out_layout=draw(LAYOUTS),
        needs_grad=draw(st.tuples(st.booleans(), st.booleans(), st.booleans())),  # x, lora_a, lora_b
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(lora_calls())
def test_property_lora_matches_reference(call):
    lead, backend, dtype = tuple(call["lead"]), call["backend"], call["dtype"]
    gen = torch.Generator().manual_seed(call["seed"])
    p = make_problem(gen, math.prod(lead), call["hidden"], call["out_features"], call["num_adapters"],
                     call["max_rank"], ids=call["ids"], dtype=dtype, device=backend_device(backend, DEVICE),
                     id_dtype=call["id_dtype"], tensor_scaling=call["tensor_scaling"],
                     heterogeneous_ranks=call["heterogeneous_ranks"])
    leaves = [laid_out(t.reshape(*lead, call["hidden"]) if t is p.x else t, layout).requires_grad_(needs)
              for t, layout, needs in zip((p.x, p.lora_a, p.lora_b), call["layouts"], call["needs_grad"])]
    ids = p.adapter_ids.reshape(lead)
    routing = {"ids": ids, "flat ids": p.adapter_ids,
               "plan": build_routing_plan(ids, p.lora_a.shape[0])}[call["routing"]]
    out = None
    if call["call"] == "lora_delta into out":
        out = laid_out(poison(gen, *lead, call["out_features"], dtype=dtype, device=p.x.device), call["out_layout"])
    out_before = None if out is None else out.clone()
    if call["call"] == "lora_linear":
        got = lora_linear(leaves[0], p.weight, *leaves[1:], routing, p.scaling, bias=p.bias, ranks=p.ranks,
                          backend=backend)
    else:
        got = lora_delta(*leaves, routing, p.scaling, out=out, ranks=p.ranks, backend=backend)
        assert out is None or got is out

    # The float64 spec on the same (rounded) values, differentiated by autograd.
    leaves64 = [t.detach().double().requires_grad_() for t in (p.x, p.lora_a, p.lora_b)]
    scaling64 = p.scaling.double() if call["tensor_scaling"] else p.scaling
    if call["call"] == "lora_linear":
        expected = lora_linear_reference(*leaves64[:1], p.weight.double(), *leaves64[1:], p.adapter_ids, scaling64,
                                         p.bias.double(), p.ranks)
    else:
        expected = lora_delta_reference(*leaves64, p.adapter_ids, scaling64, p.ranks)
    expected = expected.reshape(*lead, call["out_features"])
    assert_close_to_reference(got, expected if out_before is None else out_before.double() + expected, dtype)
    if out_before is not None:
        base_rows = ids == -1
        assert torch.equal(got.detach()[base_rows], out_before[base_rows]), "base-only tokens must be left untouched"

    if any(call["needs_grad"]):
        grad_out = poison(gen, *got.shape, dtype=dtype, device=got.device)
        got.backward(grad_out)
        expected_grads = torch.autograd.grad(expected, leaves64, grad_out.double())
        for name, leaf, want in zip(("x", "lora_a", "lora_b"), leaves, expected_grads):
            if leaf.requires_grad:
                assert_close_to_reference(leaf.grad.reshape(want.shape), want, dtype), name


# --------------------------------------------------------------------------------------------------
# Bad input: a clear TypeError/ValueError before any kernel launch, and ``out`` left as it was


@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    for launcher in ("lora_shrink", "lora_expand", "lora_weight_grad"):
        monkeypatch.setattr(switchcit.kernels, launcher, launched)
    if cpp.HAS_CPP_KERNELS:
        for kernel in ("lora_forward", "lora_backward"):
            monkeypatch.setattr(cpp._C, kernel, launched)


def good(gen, backend):
    return problem(gen, (10, 16, 12, 3, 4, "random"), backend)


def replace(p, **changes):
    args = dict(x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, adapter_ids=p.adapter_ids, scaling=p.scaling, ranks=p.ranks)
    args.update(changes)
    return args


OTHER = torch.device("meta")  # a second device that exists on every machine


def ints(values, p):
    return torch.tensor(values, device=p.x.device)


BAD_INPUTS = {
    "id >= N": (ValueError, "adapter id 3", lambda p: replace(p, adapter_ids=ints([0] * 9 + [3], p))),
    "id < -1": (ValueError, "adapter id -2", lambda p: replace(p, adapter_ids=ints([-2] + [0] * 9, p))),
    "float ids": (TypeError, "int32 or int64", lambda p: replace(p, adapter_ids=p.adapter_ids.float())),
    "ids not a tensor": (TypeError, "torch.Tensor", lambda p: replace(p, adapter_ids=[0] * 10)),
    "too few ids": (ValueError, "one id per token", lambda p: replace(p, adapter_ids=p.adapter_ids[:9])),
    "ids wrong shape": (ValueError, "one id per token", lambda p: replace(p, adapter_ids=p.adapter_ids.reshape(2, 5))),
    "x hidden != lora_a": (ValueError, "hidden size", lambda p: replace(p, x=p.x[:, :15])),
    "lora_a not 3-D": (ValueError, "3-D", lambda p: replace(p, lora_a=p.lora_a[0])),
    "lora_b N mismatch": (ValueError, "does not match lora_a", lambda p: replace(p, lora_b=p.lora_b[:2])),
    "lora_b R mismatch": (ValueError, "does not match lora_a", lambda p: replace(p, lora_b=p.lora_b[..., :3])),
    "scaling wrong shape": (ValueError, "scaling must have shape", lambda p: replace(p, scaling=p.scaling[:2])),
    "scaling int tensor": (TypeError, "floating-point", lambda p: replace(p, scaling=ints([1, 1, 1], p))),
    "scaling string": (TypeError, "scaling must be", lambda p: replace(p, scaling="1.0")),
    "ranks wrong shape": (ValueError, "ranks must have shape", lambda p: replace(p, ranks=p.ranks[:2])),
    "rank > R": (ValueError, r"ranks must lie in \[0, R=4\]", lambda p: replace(p, ranks=ints([4, 5, 1], p))),
    "negative rank": (ValueError, r"ranks must lie", lambda p: replace(p, ranks=ints([4, -1, 1], p))),
    "float ranks": (TypeError, "ranks must be int32 or int64", lambda p: replace(p, ranks=p.ranks.float())),
    "mixed dtypes": (TypeError, "lora_a has dtype", lambda p: replace(p, lora_a=p.lora_a.double())),
    "mixed devices": (ValueError, "lora_b is on meta", lambda p: replace(p, lora_b=p.lora_b.to(OTHER))),
    "ids on other device": (ValueError, "adapter_ids is on meta",
                            lambda p: replace(p, adapter_ids=p.adapter_ids.to(OTHER))),
    "integer x": (TypeError, "floating-point", lambda p: replace(p, x=p.x.long())),
    "plan for other T": (ValueError, "routing plan is for 9 tokens",
                         lambda p: replace(p, adapter_ids=build_routing_plan(p.adapter_ids[:9], 3))),
    "plan for other N": (ValueError, "routing plan is for 10 tokens and 4 adapters",
                         lambda p: replace(p, adapter_ids=build_routing_plan(p.adapter_ids, 4))),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_delta_rejects(name, backend, generator, no_launch):
    error, message, make_args = BAD_INPUTS[name]
    p = good(generator, backend)
    out = poison(generator, 10, 12, device=p.x.device)
    before = out.clone()
    with pytest.raises(error, match=message):
        lora_delta(**make_args(p), out=out, backend=backend)
    assert torch.equal(out, before), "a rejected call must not touch out"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,error,message,change",
    [
        ("weight shape", ValueError, "weight", lambda p: dict(weight=p.weight[:, :15])),
        ("weight O", ValueError, "weight", lambda p: dict(weight=p.weight[:11])),
        ("weight dtype", TypeError, "weight has dtype", lambda p: dict(weight=p.weight.double())),
        ("bias shape", ValueError, "bias", lambda p: dict(bias=p.bias[:5])),
        ("bias device", ValueError, "bias is on meta", lambda p: dict(bias=p.bias.to(OTHER))),
    ],
)
def test_lora_linear_rejects(backend, name, error, message, change, generator, no_launch):
    p = good(generator, backend)
    args = dict(x=p.x, weight=p.weight, lora_a=p.lora_a, lora_b=p.lora_b, adapter_ids=p.adapter_ids,
                scaling=p.scaling, bias=p.bias, ranks=p.ranks, backend=backend)
    args.update(change(p))
    with pytest.raises(error, match=message):
        lora_linear(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_mismatch_rejected(backend, generator, no_launch):
    p = good(generator, backend)
    with pytest.raises(ValueError, match="out has shape"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=p.x.new_zeros(10, 13), backend=backend)
    with pytest.raises(TypeError, match="out has dtype"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=p.x.new_zeros(10, 12).double(),
                   backend=backend)


# [10, 12] outs whose elements share memory, made from a random buffer: (storage size, shape, strides).
OVERLAPPING_OUTS = {
    "rows share memory": (12, (10, 12), (0, 1)),  # an expanded row
    "rows overlap": (21, (10, 12), (1, 1)),
    "leading dims overlap": (60, (2, 5, 12), (0, 12, 1)),
}


@pytest.mark.parametrize("layout", list(OVERLAPPING_OUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_out_rejected(backend, layout, generator, no_launch):
    p = good(generator, backend)
    size, shape, strides = OVERLAPPING_OUTS[layout]
    storage = poison(generator, size, device=p.x.device)
    before = storage.clone()
    x = p.x.reshape(*shape[:-1], 16)
    ids = p.adapter_ids.reshape(shape[:-1])
    with pytest.raises(ValueError, match="out has elements that share memory"):
        lora_delta(x, p.lora_a, p.lora_b, ids, p.scaling, out=storage.as_strided(shape, strides), backend=backend)
    assert torch.equal(storage, before), "a rejected call must not touch out"


def test_triton_rejects_float64_and_cpu_without_interpreter(generator, monkeypatch, no_launch):
    p = make_problem(generator, 4, 8, 8, 2, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = make_problem(generator, 4, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lora_delta(q.x, q.lora_a, q.lora_b, q.adapter_ids, q.scaling, backend="triton")


def test_ranks_checked_once_and_again_after_in_place_change(generator):
    p = good(generator, "torch")
    lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend="torch")
    p.ranks[1] = 5  # > R = 4: the cached check must not hide it
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, R=4\]"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend="torch")


# --------------------------------------------------------------------------------------------------
# The hot path: one call per layer with the forward's plan (a decode step makes ~60 of them)

HOST_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}  # each syncs a GPU
# Kernel backends whose calls can be watched: the Triton interpreter reads values on the host by design.
WATCHED_BACKENDS = [backend for backend in KERNEL_BACKENDS if backend == "cpp" or DEVICE.type == "cuda"]


class TensorCalls(TorchFunctionMode):
    """Records the name of every torch function and tensor method called inside it."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", WATCHED_BACKENDS)
def test_layer_calls_with_a_plan_read_no_values_and_never_recheck_it(backend, generator, monkeypatch):
    """Once a bank's ranks are checked, layer calls with the forward's plan (into out, and forward +
    backward) read no tensor's values on the host, and none checks the plan again: it was checked once,
    when it was built."""
    p = problem(generator, (12, 16, 20, 3, 4, "random"), backend)
    plan = build_routing_plan(p.adapter_ids, 3)
    out = poison(generator, 12, 20, device=p.x.device)
    grad_out = poison(generator, 12, 20, device=p.x.device)
    leaves = [t.detach().clone().requires_grad_() for t in (p.x, p.lora_a, p.lora_b)]
    lora_delta(p.x, p.lora_a, p.lora_b, plan, p.scaling, out=out, ranks=p.ranks, backend=backend)  # checks ranks
    plan_checks = []
    monkeypatch.setattr(routing, "_check_plan_tensors", plan_checks.append)
    monkeypatch.setattr(routing, "_check_plan_values", plan_checks.append)
    with TensorCalls() as calls:
        for _ in range(3):
            lora_delta(p.x, p.lora_a, p.lora_b, plan, p.scaling, out=out, ranks=p.ranks, backend=backend)
        lora_delta(*leaves, plan, p.scaling, ranks=p.ranks, backend=backend).backward(grad_out)
    assert "backward" in calls.names, "the calls must have been watched"
    assert not HOST_READS & set(calls.names), calls.names
    assert plan_checks == [], "the plan was checked again in a layer call"


# --------------------------------------------------------------------------------------------------
# Backend selection


def test_auto_backend_and_env_override(monkeypatch):
    x = torch.zeros(2, 4, dtype=torch.float64)
    monkeypatch.delenv("SWITCHCIT_BACKEND", raising=False)
    assert select_backend(None, x) == "torch"
    monkeypatch.setenv("SWITCHCIT_BACKEND", "triton")
    with pytest.raises(TypeError, match="float64"):
        select_backend(None, x)
    assert select_backend("torch", x) == "torch"  # an explicit argument wins over the environment
    monkeypatch.setenv("SWITCHCIT_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(None, x)
    if torch.cuda.is_available():
        monkeypatch.delenv("SWITCHCIT_BACKEND")
        assert select_backend(None, x.float().cuda()) == "triton"


# --------------------------------------------------------------------------------------------------
# The Triton kernels called directly


@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("block_m", [16, 32])
def test_triton_kernel_configs_agree(split_k, block_m, generator):
    """Split-K (the decode path) and tile sizes change the schedule, never the result."""
    p = make_problem(generator, 50, 130, 70, 6, 24, dtype=torch.float32, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 6, block_m=block_m, tiles=True)
    out = poison(generator, 50, 70, device=DEVICE)
    before = out.clone()
    config = LoraKernelConfig(block_n=32, block_k=16, split_k=split_k)
    partial = lora_shrink(p.x, p.lora_a, plan, p.ranks, config)
    assert partial.shape[0] == min(split_k, -(-130 // 16))
    lora_expand(out, partial, p.lora_b, plan, p.scaling, 1.0, p.ranks, config)
    assert_close_to_reference(out, before.double() + p.reference_delta(), torch.float32)


# --------------------------------------------------------------------------------------------------
# The C++ kernels called directly (``switchcit._C.lora_forward`` / ``lora_backward``), with data
# pointers of contiguous buffers, as switchcit.ops.cpp calls them

needs_cpp = pytest.mark.skipif(not cpp.HAS_CPP_KERNELS, reason="C++ core not built")
CPP_DTYPES = BACKEND_DTYPES.get("cpp", ())
THREADS = 2


@dataclass
class KernelCall:
    """A problem as the kernels take it: contiguous buffers, float32 scaling, int32 ranks, a plan."""

    x: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    plan: RoutingPlan
    scaling: torch.Tensor | None  # float32 [N], or None: every adapter uses `scale`
    scale: float
    ranks: torch.Tensor | None  # int32 [N], or None: every adapter uses the full rank

    @classmethod
    def of(cls, p: Problem) -> KernelCall:
        tensor_scaling = isinstance(p.scaling, torch.Tensor)
        return cls(
            x=p.x.contiguous(),
            lora_a=p.lora_a.contiguous(),
            lora_b=p.lora_b.contiguous(),
            plan=build_routing_plan(p.adapter_ids, p.lora_a.shape[0]),
            scaling=p.scaling.float().contiguous() if tensor_scaling else None,
            scale=1.0 if tensor_scaling else float(p.scaling),
            ranks=None if p.ranks is None else p.ranks.to(torch.int32).contiguous(),
        )

    def _scalars(self):
        """dtype, T, H, O, N, R, scale: the arguments after the pointers."""
        num_adapters, max_rank, hidden = self.lora_a.shape
        return (cpp.CPP_DTYPES[self.x.dtype], self.x.shape[0], hidden, self.lora_b.shape[1], num_adapters, max_rank,
                self.scale)

    def _routing(self):
        return (self.plan.sorted_token_ids.data_ptr(), self.plan.adapter_offsets.data_ptr(), _ptr(self.scaling),
                _ptr(self.ranks))

    def forward(self, out, shrunk=None, num_threads=THREADS):
        cpp._C.lora_forward(out.data_ptr(), self.x.data_ptr(), self.lora_a.data_ptr(), self.lora_b.data_ptr(),
                            *self._routing(), _ptr(shrunk), *self._scalars(), num_threads)

    def backward(self, grad_out, shrunk, grad_x=None, grad_a=None, grad_b=None, num_threads=THREADS):
        cpp._C.lora_backward(grad_out.data_ptr(), self.x.data_ptr(), self.lora_a.data_ptr(), self.lora_b.data_ptr(),
                             shrunk.data_ptr(), *self._routing(), _ptr(grad_x), _ptr(grad_a), _ptr(grad_b),
                             *self._scalars(), num_threads)

    def shrunk(self) -> torch.Tensor:
        """The forward's saved A_a x_t, as the backward needs it."""
        shrunk = torch.zeros(self.x.shape[0], self.lora_a.shape[1])
        self.forward(torch.zeros(self.x.shape[0], self.lora_b.shape[1], dtype=self.x.dtype), shrunk)
        return shrunk


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def untouched_rows(p: Problem) -> torch.Tensor:
    """Tokens whose rows the kernels must leave bitwise as they are: base only, or an adapter of rank 0."""
    ids = p.adapter_ids
    if p.ranks is None:
        return ids < 0
    return (ids < 0) | (p.ranks[ids.clamp(min=0)] == 0)


SCALINGS = pytest.mark.parametrize("tensor_scaling", [True, False], ids=["scaling_tensor", "scale_float"])
RANKS = pytest.mark.parametrize("heterogeneous_ranks", [True, False], ids=["ranks_tensor", "full_rank"])


@needs_cpp
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=str)
@SCALINGS
@RANKS
def test_cpp_forward_adds_into_out_and_saves_shrunk(case, dtype, tensor_scaling, heterogeneous_ranks, generator):
    p = problem(generator, case, "cpp", dtype, tensor_scaling=tensor_scaling, heterogeneous_ranks=heterogeneous_ranks)
    tokens, _, out_features, _, max_rank, _ = case
    out = poison(generator, tokens, out_features, dtype=dtype)
    shrunk = poison(generator, tokens, max_rank)
    out_before, shrunk_before = out.clone(), shrunk.clone()

    KernelCall.of(p).forward(out, shrunk)

    assert_close_to_reference(out, out_before.double() + p.reference_delta(), dtype)
    keep = untouched_rows(p)
    assert torch.equal(out[keep], out_before[keep]), "rows without a LoRA term must be bitwise untouched"

    base = p.adapter_ids < 0
    assert torch.equal(shrunk[base], shrunk_before[base]), "shrunk rows of base-only tokens must be untouched"
    expected_shrunk = torch.zeros(tokens, max_rank, dtype=torch.float64)
    for t in (~base).nonzero().flatten().tolist():
        adapter = int(p.adapter_ids[t])
        rank = max_rank if p.ranks is None else int(p.ranks[adapter])
        expected_shrunk[t, :rank] = p.lora_a[adapter, :rank].double() @ p.x[t].double()
    assert_close_to_reference(shrunk[~base], expected_shrunk[~base], dtype)


@needs_cpp
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=str)
@SCALINGS
@RANKS
def test_cpp_backward_matches_autograd_of_reference(case, dtype, tensor_scaling, heterogeneous_ranks, generator):
    p = problem(generator, case, "cpp", dtype, tensor_scaling=tensor_scaling, heterogeneous_ranks=heterogeneous_ranks)
    call = KernelCall.of(p)
    tokens, hidden, out_features, num_adapters, max_rank, _ = case
    grad_out = poison(generator, tokens, out_features, dtype=dtype)
    grad_x = poison(generator, tokens, hidden, dtype=dtype)  # accumulated into
    grad_a = poison(generator, num_adapters, max_rank, hidden)  # overwritten
    grad_b = poison(generator, num_adapters, out_features, max_rank)  # overwritten
    grad_x_before = grad_x.clone()

    call.backward(grad_out, call.shrunk(), grad_x, grad_a, grad_b)

    expected_x, expected_a, expected_b = p.reference_grads(grad_out)
    assert_close_to_reference(grad_x, grad_x_before.double() + expected_x, dtype)
    assert_close_to_reference(grad_a, expected_a, dtype)
    assert_close_to_reference(grad_b, expected_b, dtype)
    keep = untouched_rows(p)
    assert torch.equal(grad_x[keep], grad_x_before[keep]), "grad_x rows without a LoRA term must be untouched"


@needs_cpp
def test_cpp_heterogeneous_ranks_leave_unused_rank_slices_zero(generator):
    p = make_problem(generator, 64, 40, 36, 4, 8)
    p.ranks[:] = torch.tensor([8, 0, 3, 5])
    call = KernelCall.of(p)
    grad_a = poison(generator, 4, 8, 40)
    grad_b = poison(generator, 4, 36, 8)
    call.backward(poison(generator, 64, 36), call.shrunk(), grad_a=grad_a, grad_b=grad_b)
    for adapter, rank in enumerate(p.ranks.tolist()):
        assert torch.equal(grad_a[adapter, rank:], torch.zeros_like(grad_a[adapter, rank:]))
        assert torch.equal(grad_b[adapter, :, rank:], torch.zeros_like(grad_b[adapter, :, rank:]))
    assert torch.equal(grad_a[1], torch.zeros_like(grad_a[1])), "a rank-0 adapter has no gradient"


@needs_cpp
@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=str)
def test_cpp_gradients_can_be_skipped(dtype, generator):
    call = KernelCall.of(problem(generator, (53, 45, 39, 4, 8, "random"), "cpp", dtype))
    grad_out = poison(generator, 53, 39, dtype=dtype)
    shrunk = call.shrunk()
    initial = (poison(generator, 53, 45, dtype=dtype), poison(generator, 4, 8, 45), poison(generator, 4, 39, 8))
    full = [g.clone() for g in initial]
    call.backward(grad_out, shrunk, *full)
    for wanted in range(3):
        grads = [g.clone() for g in initial]
        passed = [g if i == wanted else None for i, g in enumerate(grads)]
        call.backward(grad_out, shrunk, *passed)
        for i, (got, expected, before) in enumerate(zip(grads, full, initial)):
            assert torch.equal(got, expected if i == wanted else before), (wanted, i)


@needs_cpp
@pytest.mark.parametrize("dtype", CPP_DTYPES, ids=str)
def test_cpp_results_do_not_depend_on_thread_count(dtype, generator):
    call = KernelCall.of(problem(generator, (203, 130, 77, 6, 16, "random"), "cpp", dtype))
    out = poison(generator, 203, 77, dtype=dtype)
    grad_out = poison(generator, 203, 77, dtype=dtype)
    results = []
    for threads in (1, 2, 3):
        forward_out, shrunk = out.clone(), torch.zeros(203, 16)
        call.forward(forward_out, shrunk, num_threads=threads)
        grad_x, grad_a, grad_b = torch.zeros(203, 130, dtype=dtype), torch.empty(6, 16, 130), torch.empty(6, 77, 16)
        call.backward(grad_out, shrunk, grad_x, grad_a, grad_b, num_threads=threads)
        results.append((forward_out, shrunk, grad_x, grad_a, grad_b))
    for other in results[1:]:
        for got, expected in zip(other, results[0]):
            assert torch.equal(got, expected)


@needs_cpp
def test_cpp_empty_batch_zeroes_weight_gradients(generator):
    call = KernelCall.of(problem(generator, (0, 24, 20, 3, 4, "random"), "cpp"))
    call.forward(torch.empty(0, 20), torch.empty(0, 4))
    grad_a, grad_b = poison(generator, 3, 4, 24), poison(generator, 3, 20, 4)
    call.backward(torch.empty(0, 20), torch.empty(0, 4), torch.empty(0, 24), grad_a, grad_b)
    assert torch.equal(grad_a, torch.zeros_like(grad_a))
    assert torch.equal(grad_b, torch.zeros_like(grad_b))


@needs_cpp
def test_cpp_bfloat16_stores_round_to_nearest_even_and_keep_nan(generator):
    # One token per value, H = R = 1 and A = 1: out[t] = bf16(out[t] + s * x[t] * B[o]) with every
    # product exact, so torch's float32 arithmetic and bfloat16 rounding give the expected bits.
    tokens, out_features = 4096, 8
    x = (torch.randn(tokens, 1, generator=generator) * 2.0 ** -6).to(torch.bfloat16)
    x[:256] = 2.0 ** -8  # exact halfway cases against the poisoned out below
    x[256] = float("nan")
    lora_b = torch.ones(1, out_features, 1, dtype=torch.bfloat16)
    out = (1 + torch.randint(0, 128, (tokens, out_features), generator=generator) * 2.0 ** -7).to(torch.bfloat16)
    p = Problem(x=x, weight=None, bias=None, lora_a=torch.ones(1, 1, 1, dtype=torch.bfloat16), lora_b=lora_b,
                adapter_ids=torch.zeros(tokens, dtype=torch.int64), scaling=1.0, ranks=None)
    expected = (out.float() + x.float() * lora_b[0, :, 0].float()).to(torch.bfloat16)

    KernelCall.of(p).forward(out)

    assert torch.isnan(out[256]).all()
    finite = torch.ones(tokens, dtype=torch.bool)
    finite[256] = False
    assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))


@needs_cpp
def test_cpp_rejects_unknown_dtype_and_mismatched_plan(generator):
    call = KernelCall.of(problem(generator, (10, 16, 16, 2, 4, "random"), "cpp"))
    out = torch.zeros(10, 16)
    args = (out.data_ptr(), call.x.data_ptr(), call.lora_a.data_ptr(), call.lora_b.data_ptr(), *call._routing(), 0)
    with pytest.raises(ValueError, match="dtype"):
        cpp._C.lora_forward(*args, "float16", 10, 16, 16, 2, 4, 1.0, 1)
    with pytest.raises(ValueError, match="num_tokens"):
        cpp._C.lora_forward(*args, "float32", 11, 16, 16, 2, 4, 1.0, 1)
