"""The switch op: hidden states of a batch → one adapter id per sequence and per token, on the device.

    sequence_ids, token_ids = switch_route(hidden, embeddings, attention_mask, head, task_to_adapter)

``hidden [B, S, D]``: the states the classifier reads (pooled: last attended token, or mean);
``embeddings [B, S, D]``: the input embeddings the unknown-task gate reads (mean); ``head``: the trained
:class:`~switchcit.ops.naive.SwitchHead`; ``task_to_adapter [tasks]``: each task's adapter id (−1: none).
Ids are int32, −1 for the base model. No host synchronisation on any backend, so the routed prefill
around it can be captured in a CUDA graph. Backends: ``"triton"`` (the fused kernel
``switchcit.kernels.fused_switch_route``; automatic on CUDA) and ``"torch"`` (:func:`route_reference`).
"""
from __future__ import annotations

import torch

from switchcit.ops.backends import select_backend
from switchcit.ops.naive import SwitchHead, route_reference

__all__ = ["switch_route"]


def switch_route(hidden: torch.Tensor, embeddings: torch.Tensor, attention_mask: torch.Tensor, head: SwitchHead,
                 task_to_adapter: torch.Tensor, pool: str = "last",
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq_len, dim = hidden.shape
    if embeddings.shape != hidden.shape or attention_mask.shape != (batch, seq_len):
        raise ValueError(f"hidden {tuple(hidden.shape)}, embeddings {tuple(embeddings.shape)} and attention mask "
                         f"{tuple(attention_mask.shape)} must be [B, S, D], [B, S, D] and [B, S]")
    if dim != head.w1.shape[1] or dim != head.class_means.shape[1]:
        raise ValueError(f"the switch reads {head.w1.shape[1]}-d features, got {dim}-d hidden states")
    if task_to_adapter.shape != (head.w2.shape[0],):
        raise ValueError(
            f"task_to_adapter needs one id per task ({head.w2.shape[0]}), got {tuple(task_to_adapter.shape)}"
        )
    if pool not in ("last", "mean"):
        raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")
    head = head.to(hidden.device)
    task_to_adapter = task_to_adapter.to(hidden.device, torch.int32)
    if select_backend(backend, hidden, op="switch") == "torch":
        return route_reference(hidden, embeddings, attention_mask, head, task_to_adapter, pool)
    from switchcit.kernels import fused_switch_route

    return fused_switch_route(
        hidden, embeddings, attention_mask, head.feature_mean, head.feature_scale, head.w1.contiguous(), head.b1,
        head.w2.contiguous(), head.b2, head.gate_feature_mean, head.gate_feature_scale, head.class_means,
        head.gate_components, head.gate_scale, head.max_distance, head.min_probability, task_to_adapter,
        pool == "last",
    )
