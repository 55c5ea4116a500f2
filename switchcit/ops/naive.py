"""Plain-PyTorch references of the package's ops: the specs every backend is tested against.

The multi-LoRA op — for token t with adapter a = a(t) (a = −1: base only):

    y_t = x_t Wᵀ + b + s_a · (x_t A_a[:r_a]ᵀ) B_a[:, :r_a]ᵀ

Works for any dtype (float64 in the tests) on any device. It loops over adapters in Python, like
PEFT's mixed-batch path, and syncs the host: clear, not fast.

The switch — pool a sequence's hidden states (last attended token, or mean), classify (normalise →
MLP → softmax → argmax), gate unknown tasks (Mahalanobis distance to the chosen task's retained
prompts, on the mean input embeddings) and map the task to its adapter id (−1: base model).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "attention_reference", "rms_norm_reference", "rotary_reference", "lora_delta_reference", "lora_linear_reference",
    "SwitchHead", "pool_features", "gate_distance", "classify_reference", "route_reference",
]


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
    # Zeros [T, O] as an empty product of x, A and B: the term stays a function of all three when no
    # token reaches an adapter of rank > 0, so autograd gives them zero gradients, as the kernel
    # backends do, and backward() does not raise.
    delta = (x @ lora_a[:0].sum(1).T) @ lora_b[:0].sum(2)
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


def pool_features(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """``hidden [B, S, D]`` → ``[B, D]``: the last attended token (left or right padding) or the mean
    over attended tokens. The reference of the fused kernel's pooling."""
    mask = attention_mask.to(hidden.dtype)
    if how == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.bool() * positions).amax(1)  # the last position whose mask is 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass
class SwitchHead:
    """What routing needs of a trained switch, as plain float32 tensors (the fused kernel's inputs):
    the classifier (feature normalisation, MLP ``w1 [H, D]``, ``w2 [tasks, H]``) and the gate (its
    own feature normalisation, class means, low-rank inverse covariance, threshold)."""

    feature_mean: torch.Tensor
    feature_scale: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    gate_feature_mean: torch.Tensor
    gate_feature_scale: torch.Tensor
    class_means: torch.Tensor  # [tasks, D], normalised gate features
    gate_components: torch.Tensor  # [K, D], rows pre-scaled so distance = gate_scale·(|d|² − |C d|²)
    gate_scale: float
    max_distance: float  # inf: gate open
    min_probability: float

    def to(self, device) -> SwitchHead:
        return replace(self, **{f.name: getattr(self, f.name).to(device, torch.float32)
                                for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})


def gate_distance(normalised: torch.Tensor, task: torch.Tensor, class_means: torch.Tensor,
                  gate_components: torch.Tensor, gate_scale: float) -> torch.Tensor:
    """Squared Mahalanobis distance of each row to its task's class mean (shrunk covariance)."""
    offset = normalised - class_means[task]
    return gate_scale * (offset.pow(2).sum(1) - (offset @ gate_components.T).pow(2).sum(1))


def classify_reference(features: torch.Tensor, gate_features: torch.Tensor, head: SwitchHead) -> torch.Tensor:
    """Task index per row of pooled features ``[B, D]`` (classifier and gate inputs), −1 where the
    gate says "unknown task"."""
    normalised = (features.float() - head.feature_mean) / head.feature_scale
    layer1 = torch.relu(normalised @ head.w1.T + head.b1)
    probability, task = torch.softmax(layer1 @ head.w2.T + head.b2, dim=1).max(1)
    gate_normalised = (gate_features.float() - head.gate_feature_mean) / head.gate_feature_scale
    distance = gate_distance(gate_normalised, task, head.class_means, head.gate_components, head.gate_scale)
    return torch.where((probability >= head.min_probability) & (distance <= head.max_distance), task, -1)


def route_reference(hidden: torch.Tensor, embeddings: torch.Tensor, attention_mask: torch.Tensor, head: SwitchHead,
                    task_to_adapter: torch.Tensor, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch spec of the fused kernel (``switchcit.kernels.fused_switch_route``, dispatched by
    :func:`switchcit.ops.switch_route`): pool ``hidden`` (``pool``: last/mean) for the classifier and
    ``embeddings`` (mean) for the gate →
    ``(adapter id per sequence [B], per token [B, S])``, −1 for the base model."""
    task = classify_reference(pool_features(hidden.float(), attention_mask, pool),
                              pool_features(embeddings.float(), attention_mask, "mean"), head)
    ids = torch.where(task >= 0, task_to_adapter.long()[task.clamp(min=0)], -1).to(torch.int32)
    return ids, ids[:, None].expand(hidden.shape[0], hidden.shape[1])


def attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
    """Softmax attention with every key head repeated for its group of query heads (transformers'
    ``repeat_kv``): ``query [B, H, Q, D]``, ``key``/``value`` ``[B, KVH, L, D]``, additive ``mask``
    broadcastable to ``[B, 1, Q, L]``; returns ``[B, Q, H, D]``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = query @ key.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ value).transpose(1, 2)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dimension, as transformers' LlamaRMSNorm:
    normalised in float32 (float64 stays float64), rounded to x's dtype, then times the weight."""
    wide = x if x.dtype == torch.float64 else x.to(torch.float32)
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotary_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of ``q [..., T, Hq, D]`` and ``k [..., T, Hk, D]`` with ``cos``/``sin``
    ``[..., T, D]``: ``x · cos + rotate_half(x) · sin``, ``rotate_half(x) = (−x[D/2:], x[:D/2])``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)

    def rotate(x):
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-second, first), dim=-1) * sin

    return rotate(q), rotate(k)
