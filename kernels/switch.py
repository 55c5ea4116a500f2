"""Fused switch classification (Triton): hidden states → adapter id per sequence and per token.

One program per sequence, one launch, no host synchronisation:

    pool (last attended token, or mean over attended tokens) → normalise → Linear → ReLU → Linear
    → softmax → argmax → (probability ≥ min_probability ? task_to_adapter[task] : −1)

and the id is written for the sequence and for each of its tokens — the input of the routing plan.
The MLP is small (D → hidden ≈ 200 → tasks), so it is done with broadcasts and row sums rather than
``tl.dot``; the reference is ``switchcit.switch.route_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_switch_route"]


@triton.jit
def _switch_route_kernel(
    hidden_ptr, mask_ptr, mean_ptr, scale_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, task_to_adapter_ptr,
    sequence_ids_ptr, token_ids_ptr,
    seq_len, features, hidden_units, num_tasks, min_probability,
    stride_hb, stride_hs, stride_hd, stride_mb, stride_ms, stride_w1h, stride_w1d, stride_w2n, stride_w2h,
    stride_tb, stride_ts,
    POOL_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    hidden_row = hidden_ptr + row * stride_hb
    mask_row = mask_ptr + row * stride_mb

    # Which tokens the pooling reads: the last attended one, or all attended ones.
    last = -1
    count = 0.0
    for s0 in range(0, seq_len, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        attended = tl.load(mask_row + s * stride_ms, mask=s < seq_len, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(attended, s, -1), axis=0))
        count += tl.sum(attended.to(tl.float32), axis=0)
    last = tl.maximum(last, 0)

    units = tl.arange(0, BLOCK_H)
    units_mask = units < hidden_units
    layer1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for d0 in range(0, features, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < features
        if POOL_LAST:
            pooled = tl.load(hidden_row + last * stride_hs + d * stride_hd, mask=d_mask, other=0.0).to(tl.float32)
        else:
            pooled = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for s0 in range(0, seq_len, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                attended = tl.load(mask_row + s * stride_ms, mask=s < seq_len, other=0) != 0
                tile = tl.load(hidden_row + s[:, None] * stride_hs + d[None, :] * stride_hd,
                               mask=attended[:, None] & d_mask[None, :], other=0.0)
                pooled += tl.sum(tile.to(tl.float32), axis=0)
            pooled = pooled / tl.maximum(count, 1.0)
        mean = tl.load(mean_ptr + d, mask=d_mask, other=0.0)
        scale = tl.load(scale_ptr + d, mask=d_mask, other=1.0)
        normalised = tl.where(d_mask, (pooled - mean) / scale, 0.0)
        w1 = tl.load(w1_ptr + units[:, None] * stride_w1h + d[None, :] * stride_w1d,
                     mask=units_mask[:, None] & d_mask[None, :], other=0.0)
        layer1 += tl.sum(w1 * normalised[None, :], axis=1)
    layer1 = tl.maximum(layer1 + tl.load(b1_ptr + units, mask=units_mask, other=0.0), 0.0)

    tasks = tl.arange(0, BLOCK_N)
    tasks_mask = tasks < num_tasks
    w2 = tl.load(w2_ptr + tasks[:, None] * stride_w2n + units[None, :] * stride_w2h,
                 mask=tasks_mask[:, None] & units_mask[None, :], other=0.0)
    logits = tl.sum(w2 * layer1[None, :], axis=1) + tl.load(b2_ptr + tasks, mask=tasks_mask, other=0.0)
    logits = tl.where(tasks_mask, logits, float("-inf"))
    best = tl.max(logits, axis=0)
    probability = 1.0 / tl.sum(tl.exp(logits - best), axis=0)  # softmax at the argmax
    task = tl.argmax(logits, axis=0)
    adapter = tl.load(task_to_adapter_ptr + task)
    adapter = tl.where(probability >= min_probability, adapter, -1)

    tl.store(sequence_ids_ptr + row, adapter)
    for s0 in range(0, seq_len, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        tl.store(token_ids_ptr + row * stride_tb + s * stride_ts, tl.zeros((BLOCK_S,), dtype=tl.int32) + adapter,
                 mask=s < seq_len)


def fused_switch_route(
    hidden: torch.Tensor, attention_mask: torch.Tensor, feature_mean: torch.Tensor, feature_scale: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, task_to_adapter: torch.Tensor,
    min_probability: float, pool_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence_ids int32 [B], token_ids int32 [B, S])`` for ``hidden [B, S, D]``; inputs assumed
    checked (fp32 MLP parameters, ``w1 [hidden, D]``, ``w2 [tasks, hidden]``, int32 ``task_to_adapter``)."""
    batch, seq_len, features = hidden.shape
    sequence_ids = torch.empty(batch, dtype=torch.int32, device=hidden.device)
    token_ids = torch.empty(batch, seq_len, dtype=torch.int32, device=hidden.device)
    if batch == 0:
        return sequence_ids, token_ids
    hidden_units, num_tasks = w1.shape[0], w2.shape[0]
    _switch_route_kernel[(batch,)](
        hidden, attention_mask, feature_mean, feature_scale, w1, b1, w2, b2, task_to_adapter,
        sequence_ids, token_ids,
        seq_len, features, hidden_units, num_tasks, float(min_probability),
        hidden.stride(0), hidden.stride(1), hidden.stride(2), attention_mask.stride(0), attention_mask.stride(1),
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), token_ids.stride(0), token_ids.stride(1),
        POOL_LAST=pool_last, BLOCK_S=16, BLOCK_D=32,
        BLOCK_H=max(16, triton.next_power_of_2(hidden_units)), BLOCK_N=max(16, triton.next_power_of_2(num_tasks)),
    )
    return sequence_ids, token_ids
