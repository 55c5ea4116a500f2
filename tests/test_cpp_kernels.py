"""The C++ CPU kernels (``switchcit._C.lora_forward`` / ``lora_backward``) against the float64 reference.

The kernels are called directly, with data pointers, as the Python integration does: every buffer is
contiguous and validated here. Outputs start poisoned with random values, so rows the kernels must not
touch are checked bitwise and rows they must overwrite cannot pass by starting at zero.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import assert_close_to_reference
from helpers import Problem, make_problem

from switchcit.ops import routing
from switchcit.ops.naive import lora_delta_reference
from switchcit.ops.routing import RoutingPlan, build_routing_plan

_C = routing._C
pytestmark = pytest.mark.skipif(_C is None, reason="C++ core not built")

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
THREADS = 2

# (T, H, O, N, R, ids): ragged sizes that are no multiple of any tile or vector width, and edge cases.
CASES = [
    (37, 70, 53, 5, 12, "random"),
    (1, 33, 17, 3, 8, "random"),
    (130, 48, 40, 4, 16, "skip_some"),  # adapters 1 and 3 get no tokens
    (29, 24, 31, 4, 8, "all_base"),
    (45, 36, 20, 6, 20, "one_adapter"),
    (19, 100, 96, 2, 64, "random"),
]


def case_id(case):
    return "T{}-H{}-O{}-N{}-R{}-{}".format(*case)


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
        return (DTYPE_NAMES[self.x.dtype], self.x.shape[0], hidden, self.lora_b.shape[1], num_adapters, max_rank,
                self.scale)

    def _routing(self):
        return (self.plan.sorted_token_ids.data_ptr(), self.plan.adapter_offsets.data_ptr(), _ptr(self.scaling),
                _ptr(self.ranks))

    def forward(self, out, shrunk=None, num_threads=THREADS):
        _C.lora_forward(out.data_ptr(), self.x.data_ptr(), self.lora_a.data_ptr(), self.lora_b.data_ptr(),
                        *self._routing(), _ptr(shrunk), *self._scalars(), num_threads)

    def backward(self, grad_out, shrunk, grad_x=None, grad_a=None, grad_b=None, num_threads=THREADS):
        _C.lora_backward(grad_out.data_ptr(), self.x.data_ptr(), self.lora_a.data_ptr(), self.lora_b.data_ptr(),
                         shrunk.data_ptr(), *self._routing(), _ptr(grad_x), _ptr(grad_a), _ptr(grad_b),
                         *self._scalars(), num_threads)

    def shrunk(self) -> torch.Tensor:
        """The forward's saved A_a x_t, as the backward needs it."""
        shrunk = torch.zeros(self.x.shape[0], self.lora_a.shape[1])
        self.forward(torch.zeros(self.x.shape[0], self.lora_b.shape[1], dtype=self.x.dtype), shrunk)
        return shrunk


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def poison(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def problem(gen, case, dtype, **kwargs) -> tuple[Problem, KernelCall]:
    tokens, hidden, out_features, num_adapters, max_rank, ids = case
    p = make_problem(gen, tokens, hidden, out_features, num_adapters, max_rank, ids=ids, dtype=dtype, **kwargs)
    return p, KernelCall.of(p)


def untouched_rows(p: Problem) -> torch.Tensor:
    """Tokens whose rows the kernels must leave bitwise as they are: base only, or an adapter of rank 0."""
    ids = p.adapter_ids
    if p.ranks is None:
        return ids < 0
    return (ids < 0) | (p.ranks[ids.clamp(min=0)] == 0)


def reference_gradients(p: Problem, grad_out: torch.Tensor):
    """Float64 autograd of the reference: gradients of x, lora_a and lora_b for grad_out."""
    x, lora_a, lora_b = (t.detach().double().requires_grad_() for t in (p.x, p.lora_a, p.lora_b))
    scaling = p.scaling.double() if isinstance(p.scaling, torch.Tensor) else p.scaling
    delta = lora_delta_reference(x, lora_a, lora_b, p.adapter_ids, scaling, p.ranks)
    inputs = (x, lora_a, lora_b)
    if not delta.requires_grad:  # no token reached an adapter of nonzero rank
        return tuple(torch.zeros_like(t) for t in inputs)
    grads = torch.autograd.grad(delta, inputs, grad_out.double(), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads))


SCALINGS = pytest.mark.parametrize("tensor_scaling", [True, False], ids=["scaling_tensor", "scale_float"])
RANKS = pytest.mark.parametrize("heterogeneous_ranks", [True, False], ids=["ranks_tensor", "full_rank"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SCALINGS
@RANKS
def test_forward_adds_into_out_and_saves_shrunk(case, dtype, tensor_scaling, heterogeneous_ranks, generator):
    p, call = problem(generator, case, dtype, tensor_scaling=tensor_scaling, heterogeneous_ranks=heterogeneous_ranks)
    tokens, _, out_features, _, max_rank, _ = case
    out = poison(generator, tokens, out_features, dtype=dtype)
    shrunk = poison(generator, tokens, max_rank)
    out_before, shrunk_before = out.clone(), shrunk.clone()

    call.forward(out, shrunk)

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


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@SCALINGS
@RANKS
def test_backward_matches_autograd_of_reference(case, dtype, tensor_scaling, heterogeneous_ranks, generator):
    p, call = problem(generator, case, dtype, tensor_scaling=tensor_scaling, heterogeneous_ranks=heterogeneous_ranks)
    tokens, hidden, out_features, num_adapters, max_rank, _ = case
    grad_out = poison(generator, tokens, out_features, dtype=dtype)
    grad_x = poison(generator, tokens, hidden, dtype=dtype)  # accumulated into
    grad_a = poison(generator, num_adapters, max_rank, hidden)  # overwritten
    grad_b = poison(generator, num_adapters, out_features, max_rank)  # overwritten
    grad_x_before = grad_x.clone()

    call.backward(grad_out, call.shrunk(), grad_x, grad_a, grad_b)

    expected_x, expected_a, expected_b = reference_gradients(p, grad_out)
    assert_close_to_reference(grad_x, grad_x_before.double() + expected_x, dtype)
    assert_close_to_reference(grad_a, expected_a, dtype)
    assert_close_to_reference(grad_b, expected_b, dtype)
    keep = untouched_rows(p)
    assert torch.equal(grad_x[keep], grad_x_before[keep]), "grad_x rows without a LoRA term must be untouched"


def test_heterogeneous_ranks_leave_unused_rank_slices_zero(generator):
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_can_be_skipped(dtype, generator):
    _, call = problem(generator, (53, 45, 39, 4, 8, "random"), dtype)
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_results_do_not_depend_on_thread_count(dtype, generator):
    _, call = problem(generator, (203, 130, 77, 6, 16, "random"), dtype)
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


def test_empty_batch_zeroes_weight_gradients(generator):
    _, call = problem(generator, (0, 24, 20, 3, 4, "random"), torch.float32)
    out = torch.empty(0, 20)
    call.forward(out, torch.empty(0, 4))
    grad_a, grad_b = poison(generator, 3, 4, 24), poison(generator, 3, 20, 4)
    call.backward(torch.empty(0, 20), torch.empty(0, 4), torch.empty(0, 24), grad_a, grad_b)
    assert torch.equal(grad_a, torch.zeros_like(grad_a))
    assert torch.equal(grad_b, torch.zeros_like(grad_b))


def test_bfloat16_stores_round_to_nearest_even_and_keep_nan(generator):
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


def test_rejects_unknown_dtype_and_mismatched_plan(generator):
    _, call = problem(generator, (10, 16, 16, 2, 4, "random"), torch.float32)
    out = torch.zeros(10, 16)
    args = (out.data_ptr(), call.x.data_ptr(), call.lora_a.data_ptr(), call.lora_b.data_ptr(), *call._routing(), 0)
    with pytest.raises(ValueError, match="dtype"):
        _C.lora_forward(*args, "float16", 10, 16, 16, 2, 4, 1.0, 1)
    with pytest.raises(ValueError, match="num_tokens"):
        _C.lora_forward(*args, "float32", 11, 16, 16, 2, 4, 1.0, 1)
