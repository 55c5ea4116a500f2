"""Kernels as ``torch.library`` custom ops that cost nothing in eager mode.

torch.compile needs custom ops (schema + fake implementation) to trace the kernels, but calling a
Python custom op goes through the dispatcher, ~0.1 ms a call — more than a decode-sized layer takes.
:func:`traceable_op` registers the op for tracing and calls the plain function otherwise.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

__all__ = ["traceable_op"]


class TraceableOp:
    def __init__(self, fn: Callable, op: torch.library.CustomOpDef):
        functools.update_wrapper(self, fn)
        self._fn, self.op = fn, op

    def __call__(self, *args):
        return self.op(*args) if torch.compiler.is_compiling() else self._fn(*args)

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake


def traceable_op(name: str, *, mutates_args: Iterable[str], device_types: str | None = None):
    """Decorator: ``fn`` becomes the custom op ``name`` under torch.compile and stays a direct call in eager."""

    def register(fn: Callable) -> TraceableOp:
        op = torch.library.custom_op(name, mutates_args=mutates_args, device_types=device_types)(fn)
        return TraceableOp(fn, op)

    return register
