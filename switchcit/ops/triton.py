"""The Triton kernels as ``torch.library`` custom ops (traceable by torch.compile), and the
forward/backward of the LoRA term composed from them.

    forward:  P = shrink(x, A);          y  += expand(P, B)
    backward: Q = shrink(dy, Bᵀ);        dx += expand(Q, Aᵀ);   dA = weight_grad(x, Q)ᵀ;   dB = weight_grad(dy, P)
"""
from __future__ import annotations

import torch

from switchcit.ops.custom_op import traceable_op
from switchcit.ops.routing import RoutingPlan

Tensor = torch.Tensor


def _schedule(sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m):
    from switchcit.kernels import TileSchedule  # imports triton only when first used

    return TileSchedule(sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m)


@traceable_op("switchcit::lora_shrink", mutates_args=())
def lora_shrink(
    src: Tensor, weight: Tensor, sorted_token_ids: Tensor, adapter_offsets: Tensor, tile_adapter: Tensor,
    tile_start: Tensor, block_m: int, ranks: Tensor | None,
) -> Tensor:
    """fp32 partial products ``[splits, T, BLOCK_R]`` of ``src [T, K]`` with ``W [N, R, K]`` per sorted row."""
    from switchcit.kernels import lora_shrink as launch

    plan = _schedule(sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m)
    return launch(src, weight, plan, ranks)


@lora_shrink.register_fake
def _(src, weight, sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m, ranks):
    from switchcit.kernels import shrink_partial_shape

    shape = shrink_partial_shape(src.shape[0], src.shape[1], weight.shape[1], tile_adapter.numel(), src.device)
    return src.new_empty(shape, dtype=torch.float32)


@traceable_op("switchcit::lora_expand_", mutates_args=("dst",))
def lora_expand_(
    dst: Tensor, partial: Tensor, weight: Tensor, sorted_token_ids: Tensor, adapter_offsets: Tensor,
    tile_adapter: Tensor, tile_start: Tensor, block_m: int, scaling: Tensor | None, scale: float,
    ranks: Tensor | None,
) -> None:
    """``dst [T, O] += s_a · partial · W_aᵀ`` per token, ``W [N, O, R]``."""
    from switchcit.kernels import lora_expand as launch

    plan = _schedule(sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m)
    launch(dst, partial, weight, plan, scaling, scale, ranks)


@lora_expand_.register_fake
def _(dst, partial, weight, sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m, scaling, scale,
      ranks):
    return None


@traceable_op("switchcit::lora_weight_grad_", mutates_args=("grad",))
def lora_weight_grad_(
    grad: Tensor, src: Tensor, partial: Tensor, sorted_token_ids: Tensor, adapter_offsets: Tensor,
    tile_adapter: Tensor, tile_start: Tensor, block_m: int, scaling: Tensor | None, scale: float,
    ranks: Tensor | None,
) -> None:
    """``grad[a] [J, R] = s_a · Σ_{tokens of a} src[t]ᵀ ⊗ partial[t]`` for every adapter."""
    from switchcit.kernels import lora_weight_grad as launch

    plan = _schedule(sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m)
    launch(grad, src, partial, plan, scaling, scale, ranks)


@lora_weight_grad_.register_fake
def _(grad, src, partial, sorted_token_ids, adapter_offsets, tile_adapter, tile_start, block_m, scaling, scale, ranks):
    return None


def _plan_args(plan: RoutingPlan) -> tuple:
    return plan.sorted_token_ids, plan.adapter_offsets, plan.tile_adapter, plan.tile_start, plan.block_m


class TritonKernels:
    """Forward into ``out`` (returning what the backward needs) and backward of the LoRA term."""

    @staticmethod
    def forward(out, x, lora_a, lora_b, plan, scaling, scale, ranks, save):
        routing = _plan_args(plan)
        shrunk = lora_shrink(x, lora_a, *routing, ranks)
        lora_expand_(out, shrunk, lora_b, *routing, scaling, scale, ranks)
        return shrunk if save else None

    @staticmethod
    def backward(grad_out, x, lora_a, lora_b, shrunk, plan, scaling, scale, ranks, needs):
        needs_x, needs_a, needs_b = needs
        routing = _plan_args(plan)
        grad_x = grad_a = grad_b = None
        if needs_x or needs_a:
            grad_shrunk = lora_shrink(grad_out, lora_b.transpose(1, 2), *routing, ranks)  # dy · B (unscaled)
        if needs_x:
            grad_x = torch.zeros_like(x)
            lora_expand_(grad_x, grad_shrunk, lora_a.transpose(1, 2), *routing, scaling, scale, ranks)
        if needs_a:
            grad_a = torch.empty_like(lora_a)
            lora_weight_grad_(grad_a.transpose(1, 2), x, grad_shrunk, *routing, scaling, scale, ranks)
        if needs_b:
            grad_b = torch.empty_like(lora_b)
            lora_weight_grad_(grad_b, grad_out, shrunk, *routing, scaling, scale, ranks)
        return grad_x, grad_a, grad_b
