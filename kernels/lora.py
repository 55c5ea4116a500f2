"""Segmented multi-LoRA kernels (Triton): out[t] += s_a · (x[t] A_aᵀ) B_aᵀ with a = adapter of token t.

Two launches over the routing plan's tile schedule (see ``switchcit.routing``); each tile is up to
``BLOCK_M`` consecutive sorted rows of one adapter, so every program multiplies by a single A/B:

* shrink  ``[tile, split]``:  partial[split, rows] = x[tokens, k-slice] · A_a[:r_a, k-slice]ᵀ   (fp32)
* expand  ``[tile, n-block]``: out[tokens, n-block] += s_a · (Σ_split partial[split, rows]) · B_a[n-block, :r_a]ᵀ

Split-K on the shrink is the decode-friendly path: with a few tokens there are few tiles, so the
hidden dimension is cut across programs to keep the GPU busy. Partials go to a small fp32 buffer
indexed by sorted row and are summed by the expand, so results are deterministic (no atomics).
Loads are masked to each adapter's own rank: no memory traffic beyond ``ranks[a]``.

Weights are indexed as one stacked tensor by adapter id, never through a pointer table (the
interpreter cannot load pointers). Offsets that can pass 2³¹ (token × stride) are computed in int64.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

__all__ = ["LoraKernelConfig", "pick_config", "segmented_lora_delta"]


@triton.jit
def _dot(a, b, DOT_FP32: tl.constexpr):
    # fp32 operands need IEEE precision (tl.dot defaults to tf32); the interpreter's bf16 dot is
    # unreliable, so it always takes this path too.
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_rows(tile, sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr,
               ranks_ptr, HAS_RANKS: tl.constexpr, MAX_RANK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Adapter, rank, sorted rows, row mask and token indices (int64) of one tile."""
    adapter = tl.load(tile_adapter_ptr + tile)
    safe_adapter = tl.maximum(adapter, 0)
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + safe_adapter), MAX_RANK)  # memory-safe if unchecked
    else:
        rank = MAX_RANK
    row_start = tl.load(tile_start_ptr + tile)
    row_end = tl.load(adapter_offsets_ptr + safe_adapter + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    tokens = tl.load(sorted_token_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    return adapter, rank, rows, row_mask, tokens


@triton.jit
def _lora_shrink_kernel(
    x_ptr, lora_a_ptr, partial_ptr,
    sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, ranks_ptr,
    hidden, k_per_split,
    stride_xt, stride_xh,
    stride_an, stride_ar, stride_ah,
    stride_ps, stride_pt,
    HAS_RANKS: tl.constexpr, MAX_RANK: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    adapter, rank, rows, row_mask, tokens = _tile_rows(
        tile, sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr,
        ranks_ptr, HAS_RANKS, MAX_RANK, BLOCK_M)
    if adapter < 0 or rank == 0:
        return

    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, hidden)
    x_rows = x_ptr + tokens[:, None] * stride_xt
    a_rows = lora_a_ptr + adapter.to(tl.int64) * stride_an + r[None, :] * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < k_end
        x_tile = tl.load(x_rows + k[None, :] * stride_xh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        a_tile = tl.load(a_rows + k[:, None] * stride_ah, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc += _dot(x_tile, a_tile, DOT_FP32)

    partial = partial_ptr + split * stride_ps + rows[:, None].to(tl.int64) * stride_pt + r[None, :]
    tl.store(partial, acc, mask=row_mask[:, None])


@triton.jit
def _lora_expand_kernel(
    partial_ptr, lora_b_ptr, out_ptr,
    sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr, ranks_ptr,
    scaling_ptr, scale,
    out_features, num_splits,
    stride_ps, stride_pt,
    stride_bn, stride_bo, stride_br,
    stride_yt, stride_yo,
    HAS_RANKS: tl.constexpr, HAS_SCALING: tl.constexpr, MAX_RANK: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tile = tl.program_id(0)
    n_block = tl.program_id(1)
    adapter, rank, rows, row_mask, tokens = _tile_rows(
        tile, sorted_token_ids_ptr, adapter_offsets_ptr, tile_adapter_ptr, tile_start_ptr,
        ranks_ptr, HAS_RANKS, MAX_RANK, BLOCK_M)
    if adapter < 0 or rank == 0:
        return

    r = tl.arange(0, BLOCK_R)
    partial = partial_ptr + rows[:, None].to(tl.int64) * stride_pt + r[None, :]
    shrunk = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for split in range(num_splits):
        shrunk += tl.load(partial + split * stride_ps, mask=row_mask[:, None], other=0.0)

    o = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    o_mask = o < out_features
    b_tile = tl.load(
        lora_b_ptr + adapter.to(tl.int64) * stride_bn + o[None, :] * stride_bo + r[:, None] * stride_br,
        mask=(r < rank)[:, None] & o_mask[None, :], other=0.0)
    if HAS_SCALING:
        scale = tl.load(scaling_ptr + adapter).to(tl.float32)
    # Like the base GEMM: 16-bit operands, fp32 accumulation.
    delta = _dot(shrunk.to(b_tile.dtype), b_tile, DOT_FP32) * scale

    out = out_ptr + tokens[:, None] * stride_yt + o[None, :] * stride_yo
    mask = row_mask[:, None] & o_mask[None, :]
    current = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


@dataclass(frozen=True)
class LoraKernelConfig:
    block_n: int = 64  # output columns per expand program
    block_k: int = 64  # hidden columns per shrink step
    split_k: int = 1  # shrink programs per tile along the hidden dimension
    num_warps: int = 4


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_config(max_tiles: int, hidden: int, device: torch.device) -> LoraKernelConfig:
    """Heuristic config: split the shrink's K until tiles × splits covers the GPU twice."""
    if device.type != "cuda":
        return LoraKernelConfig()  # interpreter: fewer, larger programs run fastest
    block_k = 64
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    split_k = max(1, min(triton.cdiv(target, max(max_tiles, 1)), triton.cdiv(hidden, 4 * block_k)))
    return LoraKernelConfig(block_n=64, block_k=block_k, split_k=split_k)


def segmented_lora_delta(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    sorted_token_ids: torch.Tensor,
    adapter_offsets: torch.Tensor,
    tile_adapter: torch.Tensor,
    tile_start: torch.Tensor,
    block_m: int,
    scaling: torch.Tensor | None,
    scale: float,
    ranks: torch.Tensor | None,
    config: LoraKernelConfig | None = None,
) -> None:
    """``out [T, O] += LoRA term`` in place. Inputs are assumed validated (``switchcit.ops`` does it)."""
    num_tokens, hidden = x.shape
    num_adapters, max_rank, _ = lora_a.shape
    out_features = lora_b.shape[1]
    max_tiles = tile_adapter.numel()
    if num_tokens == 0 or num_adapters == 0 or max_rank == 0 or out_features == 0 or max_tiles == 0:
        return
    if config is None:
        config = pick_config(max_tiles, hidden, x.device)

    block_r = max(16, triton.next_power_of_2(max_rank))
    k_per_split = triton.cdiv(triton.cdiv(hidden, config.split_k), config.block_k) * config.block_k
    num_splits = triton.cdiv(hidden, k_per_split)
    partial = torch.empty((num_splits, num_tokens, block_r), device=x.device, dtype=torch.float32)
    dot_fp32 = x.device.type == "cpu" or x.dtype == torch.float32
    routing = (sorted_token_ids, adapter_offsets, tile_adapter, tile_start)
    ranks_arg = ranks if ranks is not None else tile_adapter  # unread placeholder when HAS_RANKS=False
    scaling_arg = scaling if scaling is not None else tile_adapter

    _lora_shrink_kernel[(max_tiles, num_splits)](
        x, lora_a, partial, *routing, ranks_arg,
        hidden, k_per_split,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        partial.stride(0), partial.stride(1),
        HAS_RANKS=ranks is not None, MAX_RANK=max_rank, DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=config.block_k,
        num_warps=config.num_warps,
    )
    _lora_expand_kernel[(max_tiles, triton.cdiv(out_features, config.block_n))](
        partial, lora_b, out, *routing, ranks_arg,
        scaling_arg, float(scale),
        out_features, num_splits,
        partial.stride(0), partial.stride(1),
        lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        out.stride(0), out.stride(1),
        HAS_RANKS=ranks is not None, HAS_SCALING=scaling is not None, MAX_RANK=max_rank,
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_R=block_r,
        num_warps=config.num_warps,
    )
