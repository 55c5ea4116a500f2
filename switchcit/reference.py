"""Plain-PyTorch reference of the multi-LoRA op: the spec every backend is tested against.

For token t with adapter a = a(t) (a = −1: base only):

    y_t = x_t Wᵀ + b + s_a · (x_t A_a[:r_a]ᵀ) B_a[:, :r_a]ᵀ

Works for any dtype (float64 in the tests) on any device. It loops over adapters in Python, like
PEFT's mixed-batch path, and syncs the host: clear, not fast.
"""
from __future__ import annotations

import torch

__all__ = ["lora_delta_reference", "lora_linear_reference"]


def lora_delta_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA term alone, ``[T, O]``, for ``x [T, H]``, ``lora_a [N, R, H]``, ``lora_b [N, O, R]``."""
    num_adapters, max_rank, _ = lora_a.shape
    delta = x.new_zeros(x.shape[0], lora_b.shape[1])
    for adapter in range(num_adapters):
        rows = (adapter_ids == adapter).nonzero().squeeze(1)
        rank = max_rank if ranks is None else int(ranks[adapter])
        if rows.numel() == 0 or rank == 0:
            continue
        scale = scaling[adapter] if isinstance(scaling, torch.Tensor) else scaling
        shrunk = x[rows] @ lora_a[adapter, :rank].T
        delta[rows] = scale * (shrunk @ lora_b[adapter, :, :rank].T)
    return delta


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_ids: torch.Tensor,
    scaling: float | torch.Tensor,
    bias: torch.Tensor | None = None,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x Wᵀ + b`` plus the routed LoRA term, ``[T, O]``."""
    return torch.nn.functional.linear(x, weight, bias) + lora_delta_reference(
        x, lora_a, lora_b, adapter_ids, scaling, ranks
    )
