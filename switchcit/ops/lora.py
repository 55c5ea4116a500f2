"""The multi-LoRA op: argument checks, backend dispatch, and the ``torch.library`` registration.

    y = lora_linear(x, weight, lora_a, lora_b, adapter_ids, scaling)     # x Wᵀ + b + routed LoRA
    lora_delta(x, lora_a, lora_b, adapter_ids, scaling, out=y)           # y += routed LoRA

Shapes follow PEFT: ``x [..., H]``, ``weight [O, H]``, ``lora_a [N, R, H]``, ``lora_b [N, O, R]``,
``adapter_ids`` int32/int64 with one id per token of ``x`` (−1 = base model only) or a prebuilt
:class:`~switchcit.ops.RoutingPlan`, ``scaling`` a float or ``[N]`` tensor, ``ranks`` an optional
``[N]`` int tensor (adapter i uses its first ``ranks[i]`` rows of A and columns of B). Any size may
be 0 (T, H, O, N or R): the LoRA term is then an empty sum, zero, and so are its gradients.

Every check runs before any kernel launch and raises ``TypeError``/``ValueError``. Checking the ids'
values reads them on the host; pass a plan built once per forward (:func:`build_routing_plan`) to pay
that once for all layers. During CUDA-graph capture or ``torch.compile`` tracing value checks are
skipped and out-of-range ids route to the base model, so kernels never read out of bounds.

Backends (:mod:`switchcit.ops.backends`): ``"torch"`` (the reference in :mod:`switchcit.ops.naive`,
any dtype and device), ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``),
``"cpp"`` (CPU tensors, float32/bfloat16, the C++ core). All three are differentiable in ``x``,
``lora_a`` and ``lora_b``, with zero gradients for what no token reaches.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from switchcit.ops.backends import select_backend
from switchcit.ops.cpp import CppKernels
from switchcit.ops.naive import lora_delta_reference
from switchcit.ops.routing import RoutingPlan, build_routing_plan, check_adapter_ids, may_read_values
from switchcit.ops.triton import TritonKernels  # registers the custom ops; imports triton lazily

__all__ = ["lora_linear", "lora_delta", "add_bank_lora_"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor | RoutingPlan,
    scaling: float | torch.Tensor,
    bias: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b + scaling[a] · (x A[a]ᵀ) B[a]ᵀ`` per token, ``a`` its adapter; returns ``[..., O]``."""
    call = _prepare(x, lora_a, lora_b, adapter_ids, scaling, ranks, backend)
    hidden, out_features = call.x.shape[1], call.lora_b.shape[1]
    _check_tensor("weight", weight, 2)
    if tuple(weight.shape) != (out_features, hidden):
        raise ValueError(f"weight {tuple(weight.shape)} must be [O={out_features}, H={hidden}] to match lora_b and x")
    _check_same("weight", weight, x)
    if bias is not None:
        _check_tensor("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias {tuple(bias.shape)} must be [O={out_features}]")
        _check_same("bias", bias, x)
    out = torch.nn.functional.linear(x, weight, bias)
    return _add_lora(call, out, out.shape)


def lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor | RoutingPlan,
    scaling: float | torch.Tensor,
    out: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Add the routed LoRA term into ``out [..., O]`` (any strides, no two elements sharing memory) in
    place and return it; without ``out``, return the term alone (zero rows for base-only tokens)."""
    call = _prepare(x, lora_a, lora_b, adapter_ids, scaling, ranks, backend)
    shape = (*x.shape[:-1], call.lora_b.shape[1])
    if out is not None:
        _check_tensor("out", out, None)
        if tuple(out.shape) != shape:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {shape}")
        _check_same("out", out, x)
        if _may_overlap(out):
            raise ValueError(
                f"out has elements that share memory (shape {tuple(out.shape)}, strides {out.stride()}), so "
                "adding into it would write them more than once; pass a tensor without overlap (out.clone())"
            )
    return _add_lora(call, out, shape)


def add_bank_lora_(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   plan: RoutingPlan, scaling: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """:func:`lora_delta` into ``out`` (returned) for an adapter-bank layer with grad mode off, without the
    per-call checks where they hold already: the bank's shapes were checked as its adapters were added,
    the plan as it was built, and ``out`` is the base layer's fresh output (at a decode step those checks
    cost more than the LoRA kernel). What could still differ — token count, bank size, device, dtype,
    layout, grad mode — is checked here, and then it is :func:`lora_delta` itself."""
    tokens = plan.num_tokens
    backend = select_backend(None, x)
    if (torch.is_grad_enabled() or backend == "torch" or not (x.is_contiguous() and out.is_contiguous())
            or x.numel() != tokens * lora_a.shape[2] or out.numel() != tokens * lora_b.shape[1]
            or plan.num_adapters != lora_a.shape[0] or plan.device != x.device
            or not x.dtype == out.dtype == lora_a.dtype == lora_b.dtype):
        return lora_delta(x, lora_a, lora_b, plan, scaling, out=out, ranks=ranks)
    if backend == "triton":
        plan = plan.with_tiles()
    _kernels(backend).forward(out.view(tokens, -1), x.view(tokens, -1), lora_a, lora_b, plan, scaling, 1.0, ranks,
                              save=False)
    return out


class _Call(NamedTuple):
    """A checked call: 2-D input, bank, routing, and the backend chosen for it."""

    x: torch.Tensor  # [T, H]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    routing: torch.Tensor | RoutingPlan
    scaling: torch.Tensor | None
    scale: float
    ranks: torch.Tensor | None
    backend: str


def _prepare(x, lora_a, lora_b, adapter_ids, scaling, ranks, backend) -> _Call:
    _check_tensor("x", x, None)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (hidden)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    _check_tensor("lora_a", lora_a, 3)
    _check_tensor("lora_b", lora_b, 3)
    num_adapters, max_rank, hidden = lora_a.shape
    if hidden != _hidden(x):
        raise ValueError(f"lora_a {tuple(lora_a.shape)} does not match x's hidden size {_hidden(x)}")
    if lora_b.shape[0] != num_adapters or lora_b.shape[2] != max_rank:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: "
            f"expected [N={num_adapters}, O, R={max_rank}]"
        )
    _check_same("lora_a", lora_a, x)
    _check_same("lora_b", lora_b, x)

    num_tokens = math.prod(x.shape[:-1])
    x2 = x.reshape(num_tokens, hidden)  # not reshape(-1, H): with H = 0 the -1 would be ambiguous
    routing = _check_routing(adapter_ids, x.shape[:-1], num_tokens, num_adapters, x.device)
    scale, scaling_tensor = _check_scaling(scaling, num_adapters, x.device)
    if ranks is not None:
        _check_ranks(ranks, num_adapters, max_rank, x.device)
    name = select_backend(backend, x)
    return _Call(x2, lora_a, lora_b, routing, scaling_tensor, scale, ranks, name)


def _add_lora(call: _Call, out: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """``out += LoRA term`` for a checked call, returning ``out``; without ``out``, the term as a new tensor.
    ``shape``: the result's, ``[..., O]``."""
    if call.backend == "torch":  # the reference; plain autograd differentiates it
        ids = call.routing.token_adapter if isinstance(call.routing, RoutingPlan) else call.routing.reshape(-1)
        scaling = call.scaling if call.scaling is not None else call.scale
        delta = lora_delta_reference(call.x, call.lora_a, call.lora_b, ids, scaling, call.ranks).view(shape)
        return delta if out is None else out.add_(delta)

    kernels = _kernels(call.backend)
    plan = call.routing
    if not isinstance(plan, RoutingPlan):
        plan = build_routing_plan(plan, call.lora_a.shape[0], validate=False)  # checked in _prepare
    if call.backend == "triton":
        plan = plan.with_tiles()  # a no-op for CUDA plans; CPU plans (the interpreter) build it here
    args = (call.x, call.lora_a, call.lora_b, plan, call.scaling, call.scale, call.ranks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:3]):
        delta = _LoraDelta.apply(kernels, *args).view(shape)  # a new tensor: without out, the result itself
        return delta if out is None else out.add_(delta)
    if out is None:
        out = call.x.new_zeros(shape)
    flat = _view_2d(out, call.x.shape[0])
    target = flat if flat is not None else out.new_zeros(call.x.shape[0], call.lora_b.shape[1])
    kernels.forward(target, *args, save=False)
    if flat is None:  # out's strides admit no [T, O] view: accumulate through a temporary
        out.add_(target.view(out.shape))
    return out


class _LoraDelta(torch.autograd.Function):
    """The LoRA term as a new ``[T, O]`` tensor, differentiable in x, lora_a and lora_b."""

    @staticmethod
    def forward(ctx, kernels, x, lora_a, lora_b, plan, scaling, scale, ranks):
        delta = x.new_zeros(x.shape[0], lora_b.shape[1])
        shrunk = kernels.forward(delta, x, lora_a, lora_b, plan, scaling, scale, ranks, save=True)
        ctx.save_for_backward(x, lora_a, lora_b, shrunk, scaling, ranks)
        ctx.kernels, ctx.plan, ctx.scale = kernels, plan, scale
        return delta

    @staticmethod
    def backward(ctx, grad_delta):
        x, lora_a, lora_b, shrunk, scaling, ranks = ctx.saved_tensors
        grads = ctx.kernels.backward(
            grad_delta, x, lora_a, lora_b, shrunk, ctx.plan, scaling, ctx.scale, ranks, ctx.needs_input_grad[1:4]
        )
        return None, *grads, None, None, None, None


def _kernels(backend: str):
    return TritonKernels if backend == "triton" else CppKernels


def _view_2d(t: torch.Tensor, rows: int) -> torch.Tensor | None:
    try:
        return t.view(rows, t.shape[-1])
    except RuntimeError:
        return None


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: unless each stride, in increasing order, steps
    past all that the smaller ones span (true of every dense or sliced layout, in any dimension order)."""
    if t.is_contiguous() or t.numel() == 0:  # the usual out (a linear layer's output): nothing to sort
        return False
    span = 0
    for stride, size in sorted((abs(stride), size) for stride, size in zip(t.stride(), t.shape) if size > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _hidden(x: torch.Tensor) -> int:
    return x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() > 0 else -1


def _check_tensor(name: str, t, dim: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_same(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")


def _check_routing(adapter_ids, lead_shape, num_tokens: int, num_adapters: int, device: torch.device):
    if isinstance(adapter_ids, RoutingPlan):
        if adapter_ids.num_tokens != num_tokens or adapter_ids.num_adapters != num_adapters:
            raise ValueError(
                f"routing plan is for {adapter_ids.num_tokens} tokens and {adapter_ids.num_adapters} adapters, "
                f"but x has {num_tokens} tokens and the bank {num_adapters} adapters"
            )
        if adapter_ids.device != device:
            raise ValueError(f"routing plan is on {adapter_ids.device} but x is on {device}")
        return adapter_ids
    _check_tensor("adapter_ids", adapter_ids, None)
    if tuple(adapter_ids.shape) not in ((num_tokens,), tuple(lead_shape)):
        raise ValueError(
            f"adapter_ids has shape {tuple(adapter_ids.shape)}; expected [{num_tokens}] or {tuple(lead_shape)} "
            "(one id per token of x)"
        )
    if adapter_ids.device != device:
        raise ValueError(f"adapter_ids is on {adapter_ids.device} but x is on {device}")
    check_adapter_ids(adapter_ids, num_adapters)
    return adapter_ids


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and change only in inference mode)
        return None


def _check_scaling(scaling, num_adapters: int, device: torch.device) -> tuple[float, torch.Tensor | None]:
    if isinstance(scaling, torch.Tensor):
        if not scaling.is_floating_point():
            raise TypeError(f"scaling must be a float or a floating-point tensor, got {scaling.dtype}")
        if tuple(scaling.shape) != (num_adapters,):
            raise ValueError(f"scaling must have shape [N={num_adapters}], got {tuple(scaling.shape)}")
        if scaling.device != device:
            raise ValueError(f"scaling is on {scaling.device} but x is on {device}")
        return 1.0, scaling
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float or a [N] tensor, got {type(scaling).__name__}")
    return float(scaling), None


def _check_ranks(ranks, num_adapters: int, max_rank: int, device: torch.device) -> None:
    _check_tensor("ranks", ranks, 1)
    if ranks.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ranks must be int32 or int64, got {ranks.dtype}")
    if ranks.shape[0] != num_adapters:
        raise ValueError(f"ranks must have shape [N={num_adapters}], got {tuple(ranks.shape)}")
    if ranks.device != device:
        raise ValueError(f"ranks is on {ranks.device} but x is on {device}")
    if not num_adapters or not may_read_values(ranks):  # first: under tracing even the version is symbolic
        return
    checked = (_version(ranks), max_rank)
    if getattr(ranks, "_switchcit_checked", None) == checked:
        return
    low, high = (int(v) for v in torch.aminmax(ranks))
    if low < 0 or high > max_rank:
        raise ValueError(f"ranks must lie in [0, R={max_rank}], got values in [{low}, {high}]")
    # A bank's ranks are checked once, not per layer call (reading them syncs the GPU): any
    # in-place change bumps the version and forces a new check.
    ranks._switchcit_checked = checked


