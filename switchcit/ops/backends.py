"""One backend selector for every op of the package (the multi-LoRA op and the switch).

``backend=None`` reads ``SWITCHCIT_BACKEND``, else picks ``"triton"`` for CUDA tensors when Triton is
installed, ``"cpp"`` for CPU tensors when the C++ core is built and the op has a C++ kernel, and
``"torch"`` (the plain-PyTorch reference in :mod:`switchcit.ops.naive`) otherwise.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from switchcit.ops.cpp import CPP_DTYPES, HAS_CPP_KERNELS

__all__ = ["BACKENDS", "HAS_TRITON", "OP_BACKENDS", "select_backend"]

BACKENDS = ("torch", "triton", "cpp")
OP_BACKENDS = {"lora": BACKENDS, "switch": ("torch", "triton")}  # the switch has no C++ kernel
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HAS_TRITON = importlib.util.find_spec("triton") is not None  # looked up once: find_spec is slow


def select_backend(backend: str | None, x: torch.Tensor, op: str = "lora") -> str:
    """Resolve ``backend`` (or ``SWITCHCIT_BACKEND``, or the automatic choice) for op ``op`` on input ``x``."""
    available = OP_BACKENDS[op]
    name = backend or os.environ.get("SWITCHCIT_BACKEND") or "auto"
    if name == "auto":
        if x.is_cuda and x.dtype in TRITON_DTYPES and HAS_TRITON:
            return "triton"
        if "cpp" in available and x.is_cpu and x.dtype in CPP_DTYPES and HAS_CPP_KERNELS:
            return "cpp"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS} or 'auto'")
    if name not in available:
        raise ValueError(f"the {op} op runs on backend {' or '.join(map(repr, available))}, got {name!r}")
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
        if not (x.is_cuda or (x.is_cpu and os.environ.get("TRITON_INTERPRET") == "1")):
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {x.device}"
            )
        if x.dtype not in TRITON_DTYPES:
            raise TypeError(f"backend 'triton' supports float16, bfloat16 and float32, got {x.dtype}")
    if name == "cpp":
        if not HAS_CPP_KERNELS:
            raise RuntimeError("backend 'cpp' needs the C++ core switchcit._C; reinstall with `pip install .`")
        if not x.is_cpu:
            raise ValueError(f"backend 'cpp' needs CPU tensors, got {x.device}")
        if x.dtype not in CPP_DTYPES:
            raise TypeError(f"backend 'cpp' supports float32 and bfloat16, got {x.dtype}")
    return name
