"""Decode-step attention for grouped-query models: one new token per sequence over its cached keys.

Transformers' SDPA path repeats the keys and values once per query head of a group
(``repeat_kv``) whenever a mask is given — which the engine always gives — so a decode step copies
the whole cache ``num_key_value_groups`` times per layer (SmolLM2: 3×; at 25 sequences of 300
tokens, ~90 ms of a ~210 ms CPU step). Here the query heads of a group share one read of their
keys: ``[B, KVH, G, D] @ [B, KVH, D, L]``, the cache read in place (any strides: the engine's slots).
Prefills (more than one query token), training and dropout keep transformers' SDPA.

:func:`accelerate_attention` makes a transformers model use it (``attn_implementation``
``"switchcit"``); the reference is plain softmax attention with the keys repeated
(:func:`switchcit.ops.naive.attention_reference`).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ATTENTION", "accelerate_attention", "decode_attention"]

ATTENTION = "switchcit"  # the name transformers' AttentionInterface knows it by


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """``softmax(q kᵀ · scaling + mask) v`` of ``query [B, H, 1, D]`` over ``key``/``value``
    ``[B, KVH, L, D]`` (H a multiple of KVH; query head h reads key head h // (H / KVH)) with an
    additive ``mask`` broadcastable to ``[B, 1, 1, L]``; returns ``[B, 1, H, D]``."""
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)) * scaling  # [B, KVH, G, L]
    if mask is not None:
        scores = scores + mask.reshape(batch, 1, 1, length)
    weights = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # as SDPA: fp32 at least
    out = torch.matmul(weights.to(value.dtype), value)  # [B, KVH, G, D]
    return out.reshape(batch, 1, heads, dim)


def _attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or dropout or module.training or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    return decode_attention(query, key, value, mask, query.shape[-1] ** -0.5 if scaling is None else scaling), None


def accelerate_attention(model: nn.Module) -> nn.Module:
    """Make ``model`` (transformers, an attention-based decoder) run its decode steps through
    :func:`decode_attention`; other calls keep SDPA. A model whose attention is not SDPA, or that cannot
    change it, is left as it is. Returns ``model``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return model
    AttentionInterface.register(ATTENTION, _attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks as SDPA's: training's padding masks too
    model.set_attn_implementation(ATTENTION)
    return model
