"""The C++ CPU kernels (``switchcit._C``, OpenMP) as ``torch.library`` custom ops: the LoRA term's
forward/backward composed from them, and the dense linear layer for decode-sized batches.

The extension is built without torch headers (pip's isolated build has no torch), so it takes raw
data pointers of contiguous tensors; everything is checked here and in ``switchcit.ops`` first.
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from switchcit.ops.custom_op import traceable_op

if TYPE_CHECKING:
    from switchcit.ops.routing import RoutingPlan

try:
    from switchcit import _C
except ImportError:  # the library stays usable without its C++ core
    _C = None
    warnings.warn(
        "switchcit._C (the C++ core) is not built; CPU ops fall back to plain PyTorch. "
        "Reinstall with `pip install .` to build it.",
        stacklevel=2,
    )

Tensor = torch.Tensor

HAS_CPP_KERNELS = _C is not None and hasattr(_C, "lora_forward")
HAS_CPP_LINEAR = _C is not None and hasattr(_C, "linear_forward")  # a build older than the kernel lacks it
HAS_CPP_DECODER = _C is not None and hasattr(_C, "decode_attention_forward")
CPP_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
PARALLEL_LORA_TOKENS = 128  # fewer tokens: the LoRA forward runs on one thread


def decoder_kernels_take(*tensors: Tensor) -> bool:
    """Whether the decoder kernels (``csrc/decoder_cpu.cpp``) run for these tensors: grad mode off
    (they have no backward), contiguous CPU tensors of one dtype of ``CPP_DTYPES``."""
    if not HAS_CPP_DECODER or torch.is_grad_enabled():
        return False
    dtype = tensors[0].dtype
    return dtype in CPP_DTYPES and all(t.is_cpu and t.dtype == dtype and t.is_contiguous() for t in tensors)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _kernel_args(scaling: Tensor | None, ranks: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The C++ side reads scaling as float32 and ranks as int32."""
    return _as_contiguous(scaling, torch.float32), _as_contiguous(ranks, torch.int32)


def _as_contiguous(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # A bank's scaling and ranks usually fit already: then no tensor call at all (two per layer call).
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.to(dtype).contiguous()


@traceable_op("switchcit::cpp_lora_forward_", mutates_args=("out", "shrunk"), device_types="cpu")
def cpp_lora_forward_(
    out: Tensor, shrunk: Tensor | None, x: Tensor, lora_a: Tensor, lora_b: Tensor, sorted_token_ids: Tensor,
    adapter_offsets: Tensor, scaling: Tensor | None, scale: float, ranks: Tensor | None,
) -> None:
    """``out [T, O] += LoRA term`` (all contiguous); with ``shrunk`` (fp32 ``[T, R]``, zeros), also writes
    ``x·Aᵀ`` per routed token into it for the backward."""
    num_tokens, hidden = x.shape
    num_adapters, max_rank, _ = lora_a.shape
    scaling32, ranks32 = _kernel_args(scaling, ranks)
    # The forward shares tokens out among threads; a decode step's few tokens are a few µs of work, less
    # than waking a second thread (or waiting for one the OS has preempted), so they take one.
    threads = 1 if num_tokens < PARALLEL_LORA_TOKENS else torch.get_num_threads()
    _C.lora_forward(
        out.data_ptr(), x.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(),
        sorted_token_ids.data_ptr(), adapter_offsets.data_ptr(), _ptr(scaling32), _ptr(ranks32),
        _ptr(shrunk), CPP_DTYPES[x.dtype], num_tokens, hidden, lora_b.shape[1], num_adapters, max_rank, scale, threads,
    )


@cpp_lora_forward_.register_fake
def _(out, shrunk, x, lora_a, lora_b, sorted_token_ids, adapter_offsets, scaling, scale, ranks):
    return None


@traceable_op("switchcit::cpp_lora_backward", mutates_args=(), device_types="cpu")
def cpp_lora_backward(
    grad_out: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, shrunk: Tensor, sorted_token_ids: Tensor,
    adapter_offsets: Tensor, scaling: Tensor | None, scale: float, ranks: Tensor | None,
    needs_x: bool, needs_a: bool, needs_b: bool,
) -> list[Tensor]:
    """Gradients ``[dx, dA, dB]`` (an empty tensor where not needed), in the inputs' dtypes."""
    num_tokens, hidden = x.shape
    num_adapters, max_rank, _ = lora_a.shape
    # Outputs may not alias each other, so each unneeded gradient is its own empty tensor.
    grad_x = torch.zeros_like(x) if needs_x else x.new_empty(0)
    # Weight gradients are sums over many tokens: reduced in fp32, cast once at the end.
    grad_a = torch.empty(lora_a.shape, dtype=torch.float32) if needs_a else x.new_empty(0)
    grad_b = torch.empty(lora_b.shape, dtype=torch.float32) if needs_b else x.new_empty(0)
    scaling32, ranks32 = _kernel_args(scaling, ranks)
    _C.lora_backward(
        grad_out.data_ptr(), x.data_ptr(), lora_a.data_ptr(), lora_b.data_ptr(), shrunk.data_ptr(),
        sorted_token_ids.data_ptr(), adapter_offsets.data_ptr(), _ptr(scaling32), _ptr(ranks32),
        grad_x.data_ptr() if needs_x else 0, grad_a.data_ptr() if needs_a else 0,
        grad_b.data_ptr() if needs_b else 0, CPP_DTYPES[x.dtype],
        num_tokens, hidden, lora_b.shape[1], num_adapters, max_rank, scale, torch.get_num_threads(),
    )
    return [grad_x, grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype)]


@cpp_lora_backward.register_fake
def _(grad_out, x, lora_a, lora_b, shrunk, sorted_token_ids, adapter_offsets, scaling, scale, ranks,
      needs_x, needs_a, needs_b):
    return [torch.empty_like(t) if need else x.new_empty(0)
            for t, need in ((x, needs_x), (lora_a, needs_a), (lora_b, needs_b))]


@traceable_op("switchcit::cpp_linear", mutates_args=(), device_types="cpu")
def cpp_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [..., H] · weightᵀ (+ bias)`` → ``[..., O]``: contiguous tensors of one dtype of ``CPP_DTYPES``
    (leading dimensions kept as they are: no reshape on either side, a few µs of a decode step's layer)."""
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)  # faster than new_empty
    _C.linear_forward(out.data_ptr(), x.data_ptr(), weight.data_ptr(), _ptr(bias), CPP_DTYPES[x.dtype],
                      x.shape[:-1].numel(), x.shape[-1], weight.shape[0], torch.get_num_threads())
    return out


@cpp_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@traceable_op("switchcit::cpp_rms_norm_", mutates_args=("out", "summed"), device_types="cpu")
def cpp_rms_norm_(out: Tensor, summed: Tensor | None, x: Tensor, residual: Tensor | None, weight: Tensor,
                  eps: float) -> None:
    """``out = weight · rms_norm(x (+ residual))`` and, with a residual, ``summed = x + residual`` (all
    contiguous ``[..., H]`` of one dtype)."""
    _C.rms_norm_forward(out.data_ptr(), _ptr(summed), x.data_ptr(), _ptr(residual), weight.data_ptr(), eps,
                        CPP_DTYPES[x.dtype], x.shape[:-1].numel(), x.shape[-1], torch.get_num_threads())


@cpp_rms_norm_.register_fake
def _(out, summed, x, residual, weight, eps):
    return None


@traceable_op("switchcit::cpp_rotary_", mutates_args=("q", "k"), device_types="cpu")
def cpp_rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    """In place, ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (heads contiguous, any token stride) with
    contiguous ``cos``/``sin [T, D]``."""
    tokens, q_heads, head_dim = q.shape
    _C.rotary_forward(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), CPP_DTYPES[q.dtype], tokens,
                      q_heads, k.shape[1], head_dim, q.stride(0), k.stride(0), torch.get_num_threads())


@cpp_rotary_.register_fake
def _(q, k, cos, sin):
    return None


@traceable_op("switchcit::cpp_decode_attention", mutates_args=(), device_types="cpu")
def cpp_decode_attention(query: Tensor, key_cache: Tensor, value_cache: Tensor, positions: Tensor,
                         scaling: float) -> Tensor:
    """``query [n, H, D]``: token i over positions ``0…positions[i]`` (int64) of slot i of the contiguous
    ``key_cache``/``value_cache [slots, KVH, P, D]`` → ``[n, H, D]``."""
    out = torch.empty(query.shape, dtype=query.dtype)
    count, heads, head_dim = query.shape
    _, kv_heads, capacity, _ = key_cache.shape
    _C.decode_attention_forward(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                                positions.data_ptr(), CPP_DTYPES[query.dtype], count, heads, kv_heads, capacity,
                                head_dim, scaling, torch.get_num_threads())
    return out


@cpp_decode_attention.register_fake
def _(query, key_cache, value_cache, positions, scaling):
    return torch.empty_like(query)


class CppKernels:
    """Forward into ``out`` (returning what the backward needs) and backward of the LoRA term."""

    @staticmethod
    def forward(out, x, lora_a, lora_b, plan: RoutingPlan, scaling, scale, ranks, save):
        target = out if out.is_contiguous() else torch.zeros(out.shape, dtype=out.dtype)
        # Only the autograd path saves x·Aᵀ: inference allocates no buffer for it.
        shrunk = x.new_zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32) if save else None
        cpp_lora_forward_(
            target, shrunk, x.contiguous(), lora_a.contiguous(), lora_b.contiguous(),
            plan.sorted_token_ids, plan.adapter_offsets, scaling, scale, ranks,
        )
        if target is not out:
            out.add_(target)
        return shrunk

    @staticmethod
    def backward(grad_out, x, lora_a, lora_b, shrunk, plan: RoutingPlan, scaling, scale, ranks, needs):
        grads = cpp_lora_backward(
            grad_out.contiguous(), x.contiguous(), lora_a.contiguous(), lora_b.contiguous(), shrunk,
            plan.sorted_token_ids, plan.adapter_offsets, scaling, scale, ranks, *needs,
        )
        return tuple(grad if need else None for grad, need in zip(grads, needs))
