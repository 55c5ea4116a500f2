"""A dense linear layer for decode-sized batches: ``linear(x, weight, bias)`` is ``F.linear`` (its
plain reference, same contract), with the C++ kernel (``csrc/linear_cpu.cpp``) where it is faster.

On CPU, MKL's sgemm is slow for the few rows of a decode step (x [M, H] with M ≤ ~64): far above both
the time to read the weight once from memory and the arithmetic's (benchmarks/results/cpu-linear.md).
The kernel streams each weight row once and sums every output element in an order fixed by H alone, so
a row's result is bitwise the same alone or in any batch.

It runs only where nothing could differ but the speed: CPU tensors of one dtype (float32 or bfloat16),
a contiguous weight [O, H], at most :data:`MAX_ROWS` rows, and grad mode off (``torch.no_grad`` /
``inference_mode``: evaluation and serving). Everything else — training above all — is ``F.linear``
itself, with its results and its gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from switchcit.ops.cpp import CPP_DTYPES, HAS_CPP_LINEAR, cpp_linear

__all__ = ["MAX_ROWS", "linear", "uses_kernel"]


def _native_bfloat16() -> bool:
    """Whether the CPU has bfloat16 matrix instructions (AVX-512 BF16 or AMX), which oneDNN's GEMM uses."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


# The most rows of x for which the kernel runs (benchmarks/bench_cpu.py --op linear, AVX2 CPU). float32:
# from ~80 rows MKL is as fast or faster at SmolLM2's layer shapes. bfloat16 without bfloat16
# instructions: F.linear is ~4× slower than the kernel at every size measured (up to 1024 rows); with
# them (not measured) oneDNN is expected to win, so the float32 threshold.
MAX_ROWS = {torch.float32: 64, torch.bfloat16: 64 if _native_bfloat16() else 1024}


def uses_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` runs the C++ kernel for these arguments (else ``F.linear``)."""
    if not (HAS_CPP_LINEAR and not torch.is_grad_enabled() and x.is_cpu and x.dtype in CPP_DTYPES):
        return False
    if not (weight.is_cpu and weight.dtype == x.dtype and weight.dim() == 2 and weight.is_contiguous()):
        return False
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return False  # F.linear raises its own error
    if bias is not None and not (bias.is_cpu and bias.dtype == x.dtype and bias.shape == weight.shape[:1]
                                 and bias.is_contiguous()):
        return False
    return x.shape[:-1].numel() <= MAX_ROWS[x.dtype]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., H] · weight [O, H]ᵀ (+ bias [O])`` → ``[..., O]``, like ``torch.nn.functional.linear``."""
    if not uses_kernel(x, weight, bias):
        return F.linear(x, weight, bias)
    # x is small (a few rows): a copy of a strided one costs little next to reading the weight.
    return cpp_linear(x.contiguous(), weight, bias)
