"""Segmented multi-LoRA kernels (Triton), forward and backward.

Tokens are grouped by adapter in a routing plan (``switchcit.routing``): a stable sort of token
indices, per-adapter offsets, and a tile schedule where each tile is up to ``BLOCK_M`` consecutive
sorted rows of one adapter — so every program multiplies by a single adapter's weights. Three
launches cover the forward and the backward (``W`` is any ``[N, ·, ·]`` view, so Aᵀ and Bᵀ are free):

* shrink  ``[tile, split]``:   P[split, rows] = src[tokens, k-slice] · W_a[:r_a, k-slice]ᵀ         (fp32)
* expand  ``[tile, n-block]``: dst[tokens, n-block] += s_a · (Σ_split P[split, rows]) · W_a[n-block, :r_a]ᵀ
* weight-grad ``[adapter, j-block]``: G_a[j-block, :] = s_a · Σ_{rows of a} src[tokens, j-block]ᵀ ⊗ P[rows]

    forward:  P = shrink(x, A);             y  += expand(P, B)
    backward: Q = shrink(dy, Bᵀ);           dx += expand(Q, Aᵀ)
              dA = weight_grad(x, Q)ᵀ;      dB  = weight_grad(dy, P)

Split-K on the shrink is the decode-friendly path: with few tokens there are few tiles, so the
reduction dimension is cut across programs to keep the GPU busy. Partials go to a small fp32 buffer
indexed by sorted row and are summed by their consumer, so results are deterministic (no atomics).
Loads are masked to each adapter's rank: no memory traffic beyond ``ranks[a]``.

Weights are indexed as one stacked tensor by adapter id, never through a pointer table (the
interpreter cannot load pointers). Offsets that can pass 2³¹ (token × stride) are computed in int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "TileSchedule", "LoraKernelConfig", "pick_config", "cuda_config", "shrink_partial_shape",
    "lora_shrink", "lora_expand", "lora_weight_grad",
]


class TileSchedule(NamedTuple):
    """The routing plan's tensors the kernels read (``switchcit.routing.RoutingPlan`` has them all)."""

    sorted_token_ids: torch.Tensor  # int32 [T]
    adapter_offsets: torch.Tensor  # int32 [N + 2]
    tile_adapter: torch.Tensor  # int32 [max_tiles], −1 = idle
    tile_start: torch.Tensor  # int32 [max_tiles]
    block_m: int


@dataclass(frozen=True)
class LoraKernelConfig:
    block_n: int = 64  # output columns per expand program; columns per weight-grad program
    block_k: int = 64  # reduction columns per shrink step
    split_k: int = 1  # shrink programs per tile along the reduction dimension
    num_warps: int = 4


@cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_config(max_tiles: int, reduction: int, device: torch.device) -> LoraKernelConfig:
    """The shrink's configuration for ``device``: :func:`cuda_config` on CUDA."""
    if device.type != "cuda":
        return LoraKernelConfig()  # interpreter: fewer, larger programs run fastest
    index = device.index if device.index is not None else torch.cuda.current_device()
    return cuda_config(max_tiles, reduction, _sm_count(index))


def cuda_config(max_tiles: int, reduction: int, sm_count: int) -> LoraKernelConfig:
    """Heuristic: split the shrink's reduction until tiles × splits covers the GPU's ``sm_count`` SMs twice."""
    block_k = 64
    split_k = max(1, min(triton.cdiv(2 * sm_count, max(max_tiles, 1)), triton.cdiv(reduction, 4 * block_k)))
    return LoraKernelConfig(block_k=block_k, split_k=split_k)


def _block_r(max_rank: int) -> int:
    return max(16, triton.next_power_of_2(max_rank))


def _dot_fp32(t: torch.Tensor) -> bool:
    # fp32 operands need IEEE dots; the interpreter (CPU tensors) gets garbage from bf16 dots.
    return t.device.type == "cpu" or t.dtype == torch.float32


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _adapter_rank(adapter, ranks_ptr, HAS_RANKS: tl.constexpr, MAX_RANK: tl.constexpr):
    if HAS_RANKS:
        return tl.minimum(tl.load(ranks_ptr + adapter), MAX_RANK)  # memory-safe even if unchecked
    else:
        return MAX_RANK


@triton.jit
def _adapter_scale(adapter, scaling_ptr, scale, HAS_SCALING: tl.constexpr):
    if HAS_SCALING:
        return tl.load(scaling_ptr + adapter).to(tl.float32)
    else:
        return scale


@triton.jit
def _rows_of(row_start, row_end, sorted_token_ids_ptr, BLOCK_M: tl.constexpr):
    """Sorted rows [row_start, row_start + BLOCK_M) clipped to row_end, and their tokens (int64)."""
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(sorted_token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return rows, row_mask, tokens


@triton.jit
def _tile(tile, sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, BLOCK_M: tl.constexpr):
    """One tile of the schedule: adapter (−1 = idle), its rows, row mask and tokens."""
    adapter = tl.load(tile_adapter_ptr + tile)
    row_end = tl.load(adapter_offsets_ptr + tl.maximum(adapter, 0) + 1)
    rows, row_mask, tokens = _rows_of(tl.load(tile_start_ptr + tile), row_end, sorted_token_ids_ptr, BLOCK_M)
    return adapter, rows, row_mask, tokens


@triton.jit
def _sum_partials(partial_ptr, rows, row_mask, num_splits, stride_ps, stride_pt,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.arange(0, BLOCK_R)
    partial = partial_ptr + rows[:, None].to(tl.int64) * stride_pt + r[None, :]
    total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(num_splits):
        total += tl.load(partial + split * stride_ps, mask=row_mask[:, None], other=0.0)
    return total


@triton.jit
def _lora_shrink_kernel(
    src_ptr, weight_ptr, partial_ptr,
    sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, ranks_ptr,
    reduction, k_per_split,
    stride_st, stride_sk,
    stride_wn, stride_wr, stride_wk,
    stride_ps, stride_pt,
    HAS_RANKS: tl.constexpr, MAX_RANK: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    adapter, rows, row_mask, tokens = _tile(
        tile, sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, BLOCK_M)
    if adapter < 0:
        return
    rank = _adapter_rank(adapter, ranks_ptr, HAS_RANKS, MAX_RANK)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if rank > 0:
        k_begin = split * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, reduction)
        src_rows = src_ptr + tokens[:, None] * stride_st
        weight_rows = weight_ptr + adapter.to(tl.int64) * stride_wn + r[None, :] * stride_wr
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < k_end
            src_tile = tl.load(src_rows + k[None, :] * stride_sk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_tile = tl.load(weight_rows + k[:, None] * stride_wk, mask=k_mask[:, None] & (r < rank)[None, :],
                             other=0.0)
            acc += _dot(src_tile, w_tile, DOT_FP32)
    # Always written (zeros past the rank) so consumers may read every column.
    partial = partial_ptr + split * stride_ps + rows[:, None].to(tl.int64) * stride_pt + r[None, :]
    tl.store(partial, acc, mask=row_mask[:, None])


@triton.jit
def _lora_expand_kernel(
    partial_ptr, weight_ptr, dst_ptr,
    sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, ranks_ptr,
    scaling_ptr, scale,
    out_features, num_splits,
    stride_ps, stride_pt,
    stride_wn, stride_wo, stride_wr,
    stride_dt, stride_do,
    HAS_RANKS: tl.constexpr, HAS_SCALING: tl.constexpr, MAX_RANK: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tile = tl.program_id(0)
    n_block = tl.program_id(1)
    adapter, rows, row_mask, tokens = _tile(
        tile, sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, BLOCK_M)
    if adapter < 0:
        return
    rank = _adapter_rank(adapter, ranks_ptr, HAS_RANKS, MAX_RANK)
    if rank == 0:
        return
    shrunk = _sum_partials(partial_ptr, rows, row_mask, num_splits, stride_ps, stride_pt, BLOCK_M, BLOCK_R)
    r = tl.arange(0, BLOCK_R)
    o = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = o < out_features
    w_tile = tl.load(
        weight_ptr + adapter.to(tl.int64) * stride_wn + o[None, :] * stride_wo + r[:, None] * stride_wr,
        mask=(r < rank)[:, None] & o_mask[None, :], other=0.0)
    # Like the base GEMM: 16-bit operands, fp32 accumulation.
    delta = _dot(shrunk.to(w_tile.dtype), w_tile, DOT_FP32) * _adapter_scale(adapter, scaling_ptr, scale, HAS_SCALING)

    dst = dst_ptr + tokens[:, None] * stride_dt + o[None, :] * stride_do
    mask = row_mask[:, None] & o_mask[None, :]
    current = tl.load(dst, mask=mask, other=0.0)
    tl.store(dst, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


@triton.jit
def _lora_weight_grad_kernel(
    src_ptr, partial_ptr, grad_ptr,
    sorted_token_ids_ptr, adapter_offsets_ptr, ranks_ptr, scaling_ptr, scale,
    columns, num_splits,
    stride_st, stride_sj,
    stride_ps, stride_pt,
    stride_gn, stride_gj, stride_gr,
    HAS_RANKS: tl.constexpr, HAS_SCALING: tl.constexpr, MAX_RANK: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    adapter = tl.program_id(0)
    j_block = tl.program_id(1)
    rank = _adapter_rank(adapter, ranks_ptr, HAS_RANKS, MAX_RANK)
    j = j_block * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < columns
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_J, BLOCK_R), dtype=tl.float32)
    if rank > 0:
        row_begin = tl.load(adapter_offsets_ptr + adapter)
        row_end = tl.load(adapter_offsets_ptr + adapter + 1)
        for row_start in range(row_begin, row_end, BLOCK_M):
            rows, row_mask, tokens = _rows_of(row_start, row_end, sorted_token_ids_ptr, BLOCK_M)
            src_tile = tl.load(src_ptr + tokens[:, None] * stride_st + j[None, :] * stride_sj,
                               mask=row_mask[:, None] & j_mask[None, :], other=0.0)
            shrunk = _sum_partials(partial_ptr, rows, row_mask, num_splits, stride_ps, stride_pt, BLOCK_M, BLOCK_R)
            acc += _dot(tl.trans(src_tile), shrunk.to(src_tile.dtype), DOT_FP32)
        acc = acc * _adapter_scale(adapter, scaling_ptr, scale, HAS_SCALING)
    # Every adapter's whole [columns, MAX_RANK] slice is written: zeros where it has no tokens or rank.
    acc = tl.where((r < rank)[None, :], acc, 0.0)
    grad = grad_ptr + adapter.to(tl.int64) * stride_gn + j[:, None] * stride_gj + r[None, :] * stride_gr
    tl.store(grad, acc.to(grad_ptr.dtype.element_ty), mask=j_mask[:, None] & (r < MAX_RANK)[None, :])


def _k_per_split(reduction: int, config: LoraKernelConfig) -> int:
    # At least one block: an empty reduction (H = 0, or O = 0 in the backward) is one split of zeros.
    return max(1, triton.cdiv(triton.cdiv(reduction, config.split_k), config.block_k)) * config.block_k


def shrink_partial_shape(
    num_tokens: int, reduction: int, max_rank: int, max_tiles: int, device: torch.device,
    config: LoraKernelConfig | None = None,
) -> tuple[int, int, int]:
    """Shape of :func:`lora_shrink`'s output: ``(splits, T, BLOCK_R)``."""
    config = config or pick_config(max_tiles, reduction, device)
    return max(1, triton.cdiv(reduction, _k_per_split(reduction, config))), num_tokens, _block_r(max_rank)


def lora_shrink(
    src: torch.Tensor, weight: torch.Tensor, plan: TileSchedule, ranks: torch.Tensor | None,
    config: LoraKernelConfig | None = None,
) -> torch.Tensor:
    """Per sorted row t of adapter a: ``src[token(t)] · W_a[:r_a]ᵀ`` with ``src [T, K]``, ``W [N, R, K]``.

    Returns fp32 partial sums ``[splits, T, BLOCK_R]`` (sum over dim 0 for the product), indexed by
    sorted row; rows of base-only tokens are zero.
    """
    num_tokens, reduction = src.shape
    max_rank = weight.shape[1]
    max_tiles = plan.tile_adapter.numel()
    config = config or pick_config(max_tiles, reduction, src.device)
    k_per_split = _k_per_split(reduction, config)
    shape = shrink_partial_shape(num_tokens, reduction, max_rank, max_tiles, src.device, config)
    # Zeroed so rows of base-only tokens are defined too (the op's output is a pure function).
    partial = torch.zeros(shape, device=src.device, dtype=torch.float32)
    num_splits = shape[0]
    if max_tiles == 0 or max_rank == 0:
        return partial
    _lora_shrink_kernel[(max_tiles, num_splits)](
        src, weight, partial,
        plan.sorted_token_ids, plan.adapter_offsets, plan.tile_adapter, plan.tile_start,
        ranks if ranks is not None else plan.tile_adapter,  # unread placeholder when HAS_RANKS=False
        reduction, k_per_split,
        src.stride(0), src.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        partial.stride(0), partial.stride(1),
        HAS_RANKS=ranks is not None, MAX_RANK=max_rank, DOT_FP32=_dot_fp32(src),
        BLOCK_M=plan.block_m, BLOCK_R=partial.shape[2], BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    return partial


def lora_expand(
    dst: torch.Tensor, partial: torch.Tensor, weight: torch.Tensor, plan: TileSchedule,
    scaling: torch.Tensor | None, scale: float, ranks: torch.Tensor | None,
    config: LoraKernelConfig | None = None,
) -> None:
    """``dst[token(t)] += s_a · (Σ partial[:, t]) · W_a[:, :r_a]ᵀ`` in place, ``W [N, O, R]``, ``dst [T, O]``."""
    out_features = weight.shape[1]
    max_tiles = plan.tile_adapter.numel()
    if max_tiles == 0 or weight.shape[2] == 0 or out_features == 0:
        return
    config = config or LoraKernelConfig()
    placeholder = plan.tile_adapter
    _lora_expand_kernel[(max_tiles, triton.cdiv(out_features, config.block_n))](
        partial, weight, dst,
        plan.sorted_token_ids, plan.adapter_offsets, plan.tile_adapter, plan.tile_start,
        ranks if ranks is not None else placeholder,
        scaling if scaling is not None else placeholder, float(scale),
        out_features, partial.shape[0],
        partial.stride(0), partial.stride(1),
        weight.stride(0), weight.stride(1), weight.stride(2),
        dst.stride(0), dst.stride(1),
        HAS_RANKS=ranks is not None, HAS_SCALING=scaling is not None, MAX_RANK=weight.shape[2],
        DOT_FP32=_dot_fp32(weight),
        BLOCK_M=plan.block_m, BLOCK_N=config.block_n, BLOCK_R=partial.shape[2],
        num_warps=config.num_warps,
    )


def lora_weight_grad(
    grad: torch.Tensor, src: torch.Tensor, partial: torch.Tensor, plan: TileSchedule,
    scaling: torch.Tensor | None, scale: float, ranks: torch.Tensor | None,
    config: LoraKernelConfig | None = None,
) -> None:
    """``grad[a] = s_a · Σ_{rows of a} src[token]ᵀ ⊗ Σ partial[:, row]`` for every adapter (zeros for
    adapters without tokens), ``grad [N, J, R]`` any strides, ``src [T, J]``."""
    num_adapters, columns, max_rank = grad.shape
    if num_adapters == 0 or columns == 0 or max_rank == 0:
        return
    config = config or LoraKernelConfig()
    placeholder = plan.adapter_offsets
    _lora_weight_grad_kernel[(num_adapters, triton.cdiv(columns, config.block_n))](
        src, partial, grad,
        plan.sorted_token_ids, plan.adapter_offsets,
        ranks if ranks is not None else placeholder,
        scaling if scaling is not None else placeholder, float(scale),
        columns, partial.shape[0],
        src.stride(0), src.stride(1),
        partial.stride(0), partial.stride(1),
        grad.stride(0), grad.stride(1), grad.stride(2),
        HAS_RANKS=ranks is not None, HAS_SCALING=scaling is not None, MAX_RANK=max_rank,
        DOT_FP32=_dot_fp32(src),
        BLOCK_M=plan.block_m, BLOCK_J=config.block_n, BLOCK_R=partial.shape[2],
        num_warps=config.num_warps,
    )
