"""A decoder layer's ops besides its linear layers, and a Llama decoder-layer forward that runs them
as one C++ call each on CPU.

In a CPU decode step of transformers' Llama, what is not a linear layer is mostly dispatch: LlamaRMSNorm
is 8 ops, ``apply_rotary_pos_emb`` 14, and views, transposes and residual adds sit around them
(SmolLM2-135M: ~1,500 ops, ~18 ms of a ~60 ms one-core step at 4 sequences). :func:`rms_norm`,
:func:`add_rms_norm` and :func:`apply_rotary_` are one kernel call each (``csrc/decoder_cpu.cpp``)
where nothing can differ but the speed — contiguous CPU tensors, float32 or bfloat16, grad mode off —
and their plain references (:mod:`switchcit.ops.naive`) otherwise, results and gradients included.

:func:`accelerate_decoder` gives a model's ``LlamaDecoderLayer``s and their attention forwards built
from them: the same modules called in the same order (adapter-bank and PEFT layers included, hooks and
transformers' output capture too) and the same attention interface, with the residual add before the
second norm fused into it. Under grad mode, or off CPU, a layer runs transformers' own forwards.
"""
from __future__ import annotations

import types

import torch
from torch import nn

from switchcit.ops.cpp import cpp_rms_norm_, cpp_rotary_, decoder_kernels_take
from switchcit.ops.naive import rms_norm_reference, rotary_reference

__all__ = ["accelerate_decoder", "add_rms_norm", "apply_rotary_", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · x / sqrt(mean(x²) + eps)`` over the last dimension, as transformers' LlamaRMSNorm."""
    if not (decoder_kernels_take(x, weight) and weight.shape == x.shape[-1:]):
        return rms_norm_reference(x, weight, eps)
    out = torch.empty_like(x)
    cpp_rms_norm_(out, None, x, None, weight, eps)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(residual + x), residual + x)``: a layer's residual add and the norm after it."""
    if not (decoder_kernels_take(x, residual, weight) and x.shape == residual.shape
            and weight.shape == x.shape[-1:]):
        summed = residual + x
        return rms_norm_reference(summed, weight, eps), summed
    out, summed = torch.empty_like(x), torch.empty_like(x)
    cpp_rms_norm_(out, summed, x, residual, weight, eps)
    return out, summed


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary position embedding, in place, of ``q [..., T, Hq, D]`` and ``k [..., T, Hk, D]`` with
    ``cos``/``sin [..., T, D]`` (transformers' ``apply_rotary_pos_emb`` on the untransposed layout)."""
    head_dim = q.shape[-1]
    rows = (*q.shape[:-2], head_dim)
    if cos.shape != rows and cos.dim() == len(rows) and cos.shape[0] == 1 and cos.shape[1:] == rows[1:]:
        cos, sin = (t.expand(rows).contiguous() for t in (cos, sin))  # one row of positions for the batch
    # The kernel takes heads D apart and tokens at any stride: q and k may be views of one projection.
    if (decoder_kernels_take(cos, sin) and cos.shape == sin.shape == (*q.shape[:-2], head_dim)
            and q.shape[:-2] == k.shape[:-2] and k.shape[-1] == head_dim and head_dim % 2 == 0):
        tokens = cos.shape[:-1].numel()
        flat_q, flat_k = q.view(tokens, *q.shape[-2:]), k.view(tokens, *k.shape[-2:])
        if all(t.dtype == cos.dtype and t.stride(-1) == 1 and t.stride(-2) == head_dim for t in (flat_q, flat_k)):
            cpp_rotary_(flat_q, flat_k, cos.view(tokens, head_dim), sin.view(tokens, head_dim))
            return
    rotated_q, rotated_k = rotary_reference(q, k, cos, sin)
    q.copy_(rotated_q)
    k.copy_(rotated_k)


def accelerate_decoder(model: nn.Module) -> nn.Module:
    """Give every ``LlamaDecoderLayer`` of ``model`` (transformers; SmolLM and Llama checkpoints) whose
    forward nobody replaced, and its attention, the forwards of this module; returns ``model``.
    Instance-level and idempotent; other layers are left as they are."""
    from transformers.models.llama import modeling_llama as llama

    parts = {"input_layernorm": llama.LlamaRMSNorm, "post_attention_layernorm": llama.LlamaRMSNorm,
             "self_attn": llama.LlamaAttention, "mlp": llama.LlamaMLP}
    for module in model.modules():
        if (type(module) is llama.LlamaDecoderLayer and "forward" not in module.__dict__
                and all(type(getattr(module, name, None)) is kind and "forward" not in getattr(module, name).__dict__
                        for name, kind in parts.items())):
            module.forward = types.MethodType(_decoder_forward, module)
            module.self_attn.forward = types.MethodType(_attention_forward, module.self_attn)
    return model


def _runs_fused(hidden_states: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() and hidden_states.is_cpu


def _decoder_forward(self, hidden_states: torch.Tensor, attention_mask=None, position_ids=None,
                     past_key_values=None, use_cache=False, position_embeddings=None, **kwargs) -> torch.Tensor:
    if not _runs_fused(hidden_states):
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  position_embeddings=position_embeddings, **kwargs)
    normed = rms_norm(hidden_states, self.input_layernorm.weight, self.input_layernorm.variance_epsilon)
    # a module call, as transformers makes it: hooks on the attention (output capture, PEFT) still run
    out, _ = self.self_attn(hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache,
                            position_embeddings=position_embeddings, **kwargs)
    norm, mlp = self.post_attention_layernorm, self.mlp
    normed, hidden_states = add_rms_norm(out, hidden_states, norm.weight, norm.variance_epsilon)
    return hidden_states.add_(mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed)))


def _attention_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not _runs_fused(hidden_states):
        return type(self).forward(self, hidden_states, position_embeddings=position_embeddings,
                                  attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    tokens = hidden_states.shape[:-1]
    query, key, value = (projection(hidden_states).view(*tokens, -1, self.head_dim)
                         for projection in (self.q_proj, self.k_proj, self.v_proj))
    apply_rotary_(query, key, *position_embeddings)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, self.layer_idx)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, weights = interface(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(*tokens, -1)), weights
