"""Attention for the engine's steps, and grouped-query attention that reads each key head once.

Transformers' SDPA path repeats the keys and values once per query head of a group
(``repeat_kv``) whenever a mask is given — which the engine always gives — so a decode step copies
the whole cache ``num_key_value_groups`` times per layer (SmolLM2: 3×; at 25 sequences of 300
tokens, ~90 ms of a ~210 ms CPU step). :func:`grouped_attention` lets the query heads of a group share
one read of their keys (SDPA's ``enable_gqa``), the keys read in place (any strides).

An engine step is one forward over a flattened batch of tokens ``[1, T]`` (:class:`SlotBatch`, as
vLLM's attention metadata): first one decode token for each live sequence, then the tokens of the
prompts that join in this step, each sequence in its own slot of the KV cache. Its keys and values are
the whole cache ``[slots, kv_heads, positions, head_dim]`` (:class:`switchcit.engine.SlotCache`
writes the step's tokens into it); :func:`slot_attention` reads the slots in place: the decode tokens
over their slots — on CPU with grad mode off one C++ call for all of them (``csrc/decoder_cpu.cpp``;
SDPA's masked path costs ~150 µs a layer there), else ``[n, H, 1, D]`` queries through SDPA — and the
prompts as right-padded rows ``[k, H, W, D]`` (:class:`PromptRows`) over theirs. Both are built once per
step and reused by every layer.

:func:`accelerate_attention` makes a transformers model use it (``attn_implementation``
``"switchcit"``): forwards that carry a :class:`SlotBatch` (keyword ``slot_batch``) and decode steps
(one query token) take the grouped path; prefills without one, training and dropout keep
transformers' SDPA. The reference is plain softmax attention with the keys repeated
(:func:`switchcit.ops.naive.attention_reference`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from switchcit.ops.cpp import cpp_decode_attention, decoder_kernels_take

__all__ = ["ATTENTION", "PromptRows", "SlotBatch", "accelerate_attention", "grouped_attention", "slot_attention"]

ATTENTION = "switchcit"  # the name transformers' AttentionInterface knows it by


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scaling: float) -> torch.Tensor:
    """``softmax(q kᵀ · scaling + mask) v`` of ``query [B, H, Q, D]`` over ``key``/``value``
    ``[B, KVH, L, D]`` (H a multiple of KVH; query head h reads key head h // (H / KVH)) with a ``mask``
    (additive, or bool: true attends) broadcastable to ``[B, 1, Q, L]``; returns ``[B, Q, H, D]``.
    PyTorch's SDPA with ``enable_gqa``: the heads of a group share their keys, none repeated."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2)


@dataclass(frozen=True)
class PromptRows:
    """``k`` prompts among the ``T`` tokens of a flattened step, as right-padded rows ``[k, W]``:
    token ``tokens[i]`` sits in cell ``cells[i]`` (row · W + column). Built once per step; the switch
    reads its hidden states in these rows, and the attention its queries."""

    tokens: torch.Tensor  # [Tp] int64: indices among the T tokens
    cells: torch.Tensor  # [Tp] int64: their cells in the [k · W] rows
    num_rows: int
    width: int

    @classmethod
    def build(cls, first: int, lengths: Sequence[int], device: torch.device) -> PromptRows:
        """Prompts of ``lengths`` tokens, one after the other from token ``first`` on."""
        width = max(lengths)
        cells = torch.cat([torch.arange(length) + row * width for row, length in enumerate(lengths)])
        return cls(torch.arange(first, first + len(cells), device=device), cells.to(device), len(lengths), width)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, ...]`` → ``[k, W, ...]`` (padding cells zero)."""
        rows = x.new_zeros(self.num_rows * self.width, *x.shape[1:])
        return rows.index_copy_(0, self.cells, x.index_select(0, self.tokens)).view(self.num_rows, self.width,
                                                                                   *x.shape[1:])

    def scatter(self, rows: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """``into [T, ...]`` with its prompt tokens replaced by ``rows [k, W, ...]`` (a new tensor)."""
        values = rows.reshape(self.num_rows * self.width, *rows.shape[2:]).index_select(0, self.cells)
        return into.index_copy(0, self.tokens, values)


@dataclass(frozen=True)
class SlotBatch:
    """Where the tokens of one flattened engine step go and attend (see the module docstring): tokens
    ``0…n−1`` decode slots ``0…n−1``, the others are ``prompts`` in slots ``prompt_slot…prompt_slot+k−1``;
    token ``t`` is at position ``positions[t]`` of slot ``slots[t]``. ``token_mask [1, 1, T, L]``
    (additive): token ``t`` sees the positions of its own slot where it is 0 — the 4-D mask
    transformers is handed; ``decode_mask`` and ``prompt_mask`` are its parts as the two attention calls
    read them."""

    num_decode: int
    prompts: PromptRows | None
    prompt_slot: int
    slots: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    token_mask: torch.Tensor
    decode_mask: torch.Tensor | None  # [n, 1, 1, decode positions]
    prompt_mask: torch.Tensor | None  # [k, 1, W, prompt positions]

    @classmethod
    def build(cls, decode_positions: Sequence[int], prompt_positions: Sequence[tuple[int, int]], prompt_slot: int,
              dtype: torch.dtype, device: torch.device) -> SlotBatch:
        """``decode_positions``: each decode token's position (its slot's length so far);
        ``prompt_positions``: each prompt's ``(start, end)``, its tokens' positions ``start…end−1`` (``start``
        > 0: the slot already holds the positions before, a shared prefix)."""
        num_decode = len(decode_positions)
        slots = [*range(num_decode), *(prompt_slot + row for row, (start, end) in enumerate(prompt_positions)
                                       for _ in range(start, end))]
        positions = torch.tensor([*decode_positions,
                                  *(p for start, end in prompt_positions for p in range(start, end))])
        allowed = torch.arange(int(positions.max()) + 1)[None] <= positions[:, None]
        token_mask = _additive(allowed.to(device), dtype)  # [T, L]
        decode_mask = prompts = prompt_mask = None
        if num_decode:
            decode_mask = token_mask[:num_decode, None, None, : max(decode_positions) + 1]
        if prompt_positions:
            prompts = PromptRows.build(num_decode, [end - start for start, end in prompt_positions], device)
            # padding cells see every position (a row of 0s: no NaN); their outputs are never read
            prompt_mask = prompts.gather(token_mask)[:, None, :, : max(end for _, end in prompt_positions)]
        return cls(num_decode, prompts, prompt_slot, torch.tensor(slots, device=device), positions.to(device),
                   token_mask[None, None], decode_mask, prompt_mask)


def slot_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: SlotBatch,
                   scaling: float) -> torch.Tensor:
    """Attention of a flattened step's ``query [1, H, T, D]`` over the slot cache ``key_cache`` /
    ``value_cache`` ``[slots, KVH, positions, D]`` (the step's own keys already written); returns
    ``[1, T, H, D]``."""
    queries = query[0].transpose(0, 1)  # [T, H, D]
    parts, count = [], batch.num_decode
    # the kernel reads positions 0…positions[i] of slot i unchecked: only a cache that holds them
    if (count and decoder_kernels_take(queries, key_cache, value_cache) and count <= key_cache.shape[0]
            and batch.decode_mask.shape[-1] <= key_cache.shape[2] and batch.positions.dtype == torch.int64):
        parts.append(cpp_decode_attention(queries[:count], key_cache, value_cache, batch.positions[:count], scaling))
    elif count:
        length = batch.decode_mask.shape[-1]
        keys, values = (c[:count, :, :length] for c in (key_cache, value_cache))
        parts.append(grouped_attention(queries[:count, :, None], keys, values, batch.decode_mask, scaling)[:, 0])
    if batch.prompts is not None:
        rows, length = batch.prompts, batch.prompt_mask.shape[-1]
        slots = slice(batch.prompt_slot, batch.prompt_slot + rows.num_rows)
        keys, values = (c[slots, :, :length] for c in (key_cache, value_cache))
        out = grouped_attention(rows.gather(queries).transpose(1, 2), keys, values, batch.prompt_mask, scaling)
        parts.append(out.reshape(-1, *out.shape[2:]).index_select(0, rows.cells))  # [Tp, H, D]
    return (parts[0] if len(parts) == 1 else torch.cat(parts))[None]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as an additive float mask."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                       torch.finfo(dtype).min)


def _attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                       scaling: float | None = None, slot_batch: SlotBatch | None = None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if slot_batch is not None:
        return slot_attention(query, key, value, slot_batch, scaling), None
    if query.shape[2] != 1 or dropout or module.training or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    mask = None if attention_mask is None else attention_mask[..., : key.shape[2]]  # SDPA takes bool or float
    return grouped_attention(query, key, value, mask, scaling), None


def accelerate_attention(model: nn.Module) -> nn.Module:
    """Make ``model`` (transformers, an attention-based decoder) run engine steps and decode steps
    through :func:`slot_attention` / :func:`grouped_attention`; other calls keep SDPA. A model whose
    attention is not SDPA, or that cannot change it, is left as it is. Returns ``model``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return model
    AttentionInterface.register(ATTENTION, _attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks as SDPA's: training's padding masks too
    model.set_attn_implementation(ATTENTION)
    return model
