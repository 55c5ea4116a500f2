"""Fused switch classification (Triton): hidden states → adapter id per sequence and per token.

Two launches, no host synchronisation (so routing can sit inside a captured CUDA graph):

1. ``_pool_kernel`` — one program per (sequence, feature block): the classifier's input (last
   attended token, or mean over attended tokens, of ``hidden``) and the gate's input (mean of the
   input ``embeddings``), written to two small fp32 buffers ``[B, D]``.
2. ``_classify_kernel`` — one program per sequence: normalise → Linear → ReLU → Linear → softmax →
   argmax, then the unknown-task gate (Mahalanobis distance to the chosen task's mean, low-rank form)
   → ``task_to_adapter[task]`` or −1, written for the sequence and for each of its tokens (the input
   of the routing plan).

Pooling needs every token of a feature block, the MLP needs every feature of a sequence: splitting
there lets pooling spread over ``B × D/BLOCK_D`` programs. The MLP and gate are small (D → ~200 →
tasks, K ≤ 128 components), so they use broadcasts and row sums rather than ``tl.dot``. The reference
is ``switchcit.ops.naive.route_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fused_switch_route"]


@triton.jit
def _pool_kernel(
    hidden_ptr, embeddings_ptr, mask_ptr, pooled_ptr, gate_pooled_ptr,
    seq_len, features,
    stride_hb, stride_hs, stride_hd, stride_eb, stride_es, stride_ed, stride_mb, stride_ms,
    POOL_LAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d < features
    mask_row = mask_ptr + row * stride_mb

    last = -1
    count = 0.0
    hidden_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    embeddings_sum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s0 in range(0, seq_len, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        attended = tl.load(mask_row + s * stride_ms, mask=s < seq_len, other=0) != 0
        last = tl.maximum(last, tl.max(tl.where(attended, s, -1), axis=0))
        count += tl.sum(attended.to(tl.float32), axis=0)
        tile_mask = attended[:, None] & d_mask[None, :]
        embeddings = tl.load(embeddings_ptr + row * stride_eb + s[:, None] * stride_es + d[None, :] * stride_ed,
                             mask=tile_mask, other=0.0)
        embeddings_sum += tl.sum(embeddings.to(tl.float32), axis=0)
        if not POOL_LAST:
            hidden = tl.load(hidden_ptr + row * stride_hb + s[:, None] * stride_hs + d[None, :] * stride_hd,
                             mask=tile_mask, other=0.0)
            hidden_sum += tl.sum(hidden.to(tl.float32), axis=0)
    count = tl.maximum(count, 1.0)
    if POOL_LAST:
        pooled = tl.load(hidden_ptr + row * stride_hb + tl.maximum(last, 0) * stride_hs + d * stride_hd,
                         mask=d_mask, other=0.0).to(tl.float32)
    else:
        pooled = hidden_sum / count
    tl.store(pooled_ptr + row * features + d, pooled, mask=d_mask)
    tl.store(gate_pooled_ptr + row * features + d, embeddings_sum / count, mask=d_mask)


@triton.jit
def _normalised(row_ptr, mean_ptr, scale_ptr, d, d_mask):
    """A block of a pooled feature row, standardised as the switch was trained (0 outside the row)."""
    pooled = tl.load(row_ptr + d, mask=d_mask, other=0.0)
    mean = tl.load(mean_ptr + d, mask=d_mask, other=0.0)
    scale = tl.load(scale_ptr + d, mask=d_mask, other=1.0)
    return tl.where(d_mask, (pooled - mean) / scale, 0.0)


@triton.jit
def _classify_kernel(
    pooled_ptr, gate_pooled_ptr, mean_ptr, scale_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    gate_mean_ptr, gate_scale_ptr, class_means_ptr, components_ptr, task_to_adapter_ptr,
    sequence_ids_ptr, token_ids_ptr,
    seq_len, features, hidden_units, num_tasks, num_components, gate_scale, max_distance, min_probability,
    stride_w1h, stride_w1d, stride_w2n, stride_w2h, stride_cn, stride_cd, stride_kk, stride_kd, stride_tb, stride_ts,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)

    units = tl.arange(0, BLOCK_H)
    units_mask = units < hidden_units
    layer1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for d0 in range(0, features, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < features
        normalised = _normalised(pooled_ptr + row * features, mean_ptr, scale_ptr, d, d_mask)
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
    probability = 1.0 / tl.sum(tl.exp(logits - tl.max(logits, axis=0)), axis=0)  # softmax at the argmax
    task = tl.argmax(logits, axis=0)

    # Gate: distance = gate_scale · (|offset|² − |C·offset|²), offset = normalised gate input − task mean.
    components = tl.arange(0, BLOCK_K)
    components_mask = components < num_components
    squared = 0.0
    projection = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, features, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < features
        class_mean = tl.load(class_means_ptr + task * stride_cn + d * stride_cd, mask=d_mask, other=0.0)
        gate_input = _normalised(gate_pooled_ptr + row * features, gate_mean_ptr, gate_scale_ptr, d, d_mask)
        offset = tl.where(d_mask, gate_input - class_mean, 0.0)
        squared += tl.sum(offset * offset, axis=0)
        c = tl.load(components_ptr + components[:, None] * stride_kk + d[None, :] * stride_kd,
                    mask=components_mask[:, None] & d_mask[None, :], other=0.0)
        projection += tl.sum(c * offset[None, :], axis=1)
    distance = gate_scale * (squared - tl.sum(projection * projection, axis=0))

    adapter = tl.load(task_to_adapter_ptr + task)
    adapter = tl.where((probability >= min_probability) & (distance <= max_distance), adapter, -1)
    tl.store(sequence_ids_ptr + row, adapter)
    for s0 in range(0, seq_len, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        tl.store(token_ids_ptr + row * stride_tb + s * stride_ts, tl.zeros((BLOCK_S,), dtype=tl.int32) + adapter,
                 mask=s < seq_len)


def fused_switch_route(
    hidden: torch.Tensor, embeddings: torch.Tensor, attention_mask: torch.Tensor,
    feature_mean: torch.Tensor, feature_scale: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, gate_feature_mean: torch.Tensor, gate_feature_scale: torch.Tensor,
    class_means: torch.Tensor, gate_components: torch.Tensor, gate_scale: float, max_distance: float,
    min_probability: float, task_to_adapter: torch.Tensor, pool_last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequence_ids int32 [B], token_ids int32 [B, S])`` for ``hidden`` and ``embeddings [B, S, D]``;
    inputs assumed checked (contiguous fp32 switch parameters, ``w1 [H, D]``, ``w2 [tasks, H]``,
    ``class_means [tasks, D]``, ``gate_components [K ≤ 128, D]``, int32 ``task_to_adapter``)."""
    batch, seq_len, features = hidden.shape
    sequence_ids = torch.empty(batch, dtype=torch.int32, device=hidden.device)
    token_ids = torch.empty(batch, seq_len, dtype=torch.int32, device=hidden.device)
    if batch == 0:
        return sequence_ids, token_ids
    pooled = torch.empty(2, batch, features, dtype=torch.float32, device=hidden.device)  # classifier, gate
    block_s, block_d = 16, 32
    _pool_kernel[(batch, triton.cdiv(features, block_d))](
        hidden, embeddings, attention_mask, pooled[0], pooled[1], seq_len, features,
        hidden.stride(0), hidden.stride(1), hidden.stride(2), embeddings.stride(0), embeddings.stride(1),
        embeddings.stride(2), attention_mask.stride(0), attention_mask.stride(1),
        POOL_LAST=pool_last, BLOCK_S=block_s, BLOCK_D=block_d,
    )
    hidden_units, num_tasks, num_components = w1.shape[0], w2.shape[0], gate_components.shape[0]
    _classify_kernel[(batch,)](
        pooled[0], pooled[1], feature_mean, feature_scale, w1, b1, w2, b2,
        gate_feature_mean, gate_feature_scale, class_means, gate_components, task_to_adapter,
        sequence_ids, token_ids,
        seq_len, features, hidden_units, num_tasks, num_components, float(gate_scale), float(max_distance),
        float(min_probability),
        w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), class_means.stride(0), class_means.stride(1),
        gate_components.stride(0), gate_components.stride(1), token_ids.stride(0), token_ids.stride(1),
        BLOCK_S=block_s, BLOCK_D=block_d, BLOCK_H=max(16, triton.next_power_of_2(hidden_units)),
        BLOCK_N=max(16, triton.next_power_of_2(num_tasks)), BLOCK_K=max(16, triton.next_power_of_2(num_components)),
    )
    return sequence_ids, token_ids
