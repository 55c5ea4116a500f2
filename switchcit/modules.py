"""PyTorch modules: a model's routing context and the adapter-bank linear layer.

A model holds one :class:`RoutingContext`. Inside the library an adapter is an int id and −1
(:data:`NO_ADAPTER`) is the only "no adapter"; names exist at the edges. The routing of a forward is
written by one owner before the layers run, and layers only read ``context.plan``:

* :meth:`RoutingContext.assign` sets one adapter id per sequence for the following forwards
  (``switchcit.set_adapters`` for hand-written loops), or one per token of the next forward (the
  engine's steps, a flattened batch of tokens);
* :meth:`RoutingContext.begin_forward` turns that into the forward's :class:`RoutingPlan` — called
  by a pre-hook on the model's input embeddings, so it runs once per forward, before any layer;
* :meth:`RoutingContext.route_tokens` replaces the plan in the middle of a forward: the switch reads
  layer K's hidden states and routes layers K…L−1 (:mod:`switchcit.pipeline`).

:func:`accelerate_linear` sends a model's plain ``nn.Linear`` layers — the base layers of bank and PEFT
layers included — through :func:`switchcit.ops.linear`: the C++ kernel in decode steps on CPU.
"""
from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch
from torch import nn

from switchcit.ops import RoutingPlan, build_routing_plan, linear, lora_delta
from switchcit.ops.lora import add_bank_lora_
from switchcit.ops.routing import check_adapter_ids

__all__ = ["NO_ADAPTER", "RoutingContext", "MultiLoraLinear", "attach_context", "linear_features",
           "accelerate_linear", "restore_linear"]

NO_ADAPTER = -1  # the base model: the only "no adapter" inside the library


class RoutingContext:
    """Adapter names ↔ ids of a model, and the routing plan of its current forward.

    Ids are stable: adding an adapter appends, removing one leaves its id unused, so plans and banks
    built earlier stay valid.
    """

    def __init__(self, names: Sequence[str] = ()):
        self.names: list[str | None] = []  # None marks a removed adapter
        self.sequence_ids: torch.Tensor | None = None  # int [B]: the assigned adapter of each sequence
        self._per_token = False  # sequence_ids holds one id per token instead (assign(tokens=True))
        self._plan: RoutingPlan | None = None
        for name in names:
            self.add(name)

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    @property
    def adapters(self) -> list[str]:
        """The loaded adapters' names, in id order."""
        return [n for n in self.names if n is not None]

    def id_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown adapter {name!r}; loaded: {self.adapters}") from None

    def add(self, name: str) -> int:
        if not isinstance(name, str) or not name:
            raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self.names:
            return self.names.index(name)
        self.names.append(name)
        return len(self.names) - 1

    def remove(self, name: str) -> int:
        index = self.id_of(name)
        self.names[index] = None
        return index

    @property
    def plan(self) -> RoutingPlan | None:
        """The current forward's plan (``None``: every token on the base model). An adapter that joined
        after it was built (a PEFT layer met a new adapter) gets a plan with the same tokens and one
        more, empty, adapter."""
        if self._plan is not None and self._plan.num_adapters != self.num_adapters:
            self._plan = build_routing_plan(self._plan.token_adapter, self.num_adapters, validate=False)
        return self._plan

    def ids_of(self, names: Sequence[str | None], device=None) -> torch.Tensor:
        """Names (``None``: the base model) → an int64 id tensor: the names edge."""
        return torch.tensor([NO_ADAPTER if n is None else self.id_of(n) for n in names], dtype=torch.int64,
                            device=device)

    def assign(self, sequence_ids: torch.Tensor | None, *, checked: bool = False, tokens: bool = False) -> None:
        """One adapter id per sequence (−1: base model) for the following forwards; ``None``: none
        assigned (bank layers then run the base model); ``tokens``: one id per token of the next forward
        instead (a flattened batch: the engine's steps). The ids' values are checked here, once, not in
        every forward (on CUDA a check is a host sync); ``checked``: the caller's own valid ids, not read."""
        if sequence_ids is not None:
            if not isinstance(sequence_ids, torch.Tensor) or sequence_ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter ids must be an int32 or int64 tensor, got {sequence_ids!r:.60}")
            if not checked:
                check_adapter_ids(sequence_ids, self.num_adapters)
            sequence_ids = sequence_ids.reshape(-1)
        self.sequence_ids, self._plan, self._per_token = sequence_ids, None, tokens

    def begin_forward(self, input_shape: Sequence[int], device: torch.device) -> None:
        """The plan of a forward over tokens ``input_shape`` ([B, S]) from the assigned ids — built once
        here, before any layer runs. ``B`` may be k × the assigned sequences (beam search,
        ``num_return_sequences``)."""
        ids = self.sequence_ids
        if ids is None:
            self._plan = None
            return
        batch, sequences, tokens = input_shape[0], ids.numel(), math.prod(input_shape)
        if self._per_token:
            if sequences != tokens:
                raise ValueError(f"{sequences} adapter ids for a forward of {tokens} tokens")
            self.route_tokens(ids.to(device), validate=False)  # checked in assign
            return
        if sequences == 0 or batch % sequences:
            raise ValueError(f"{sequences} routed sequences do not fit a batch of {batch}")
        self.route_tokens(ids.to(device).repeat_interleave(tokens // sequences), validate=False)

    def route_tokens(self, token_ids: torch.Tensor, sequence_ids: torch.Tensor | None = None, *,
                     validate: bool = True) -> None:
        """Set the current forward's plan from one id per token (flattened ``[B, S]``); with
        ``sequence_ids``, also assign them for the forwards that follow (decode steps). ``validate``:
        check the ids' values (see :func:`switchcit.build_routing_plan`)."""
        if sequence_ids is not None:
            self.sequence_ids = sequence_ids.reshape(-1)
        self._plan = build_routing_plan(token_ids.reshape(-1), self.num_adapters, validate=validate)


def attach_context(model: nn.Module, context: RoutingContext) -> RoutingContext:
    """Give ``model`` its routing context (once): a pre-hook on the input embeddings builds each
    forward's plan before any layer runs."""
    embeddings = model.get_input_embeddings()
    if getattr(embeddings, "_switchcit_context", None) is not context:
        embeddings._switchcit_context = context
        embeddings.register_forward_pre_hook(_begin_forward)
    return context


def _begin_forward(embeddings: nn.Module, args: tuple) -> None:
    input_ids = args[0]
    embeddings._switchcit_context.begin_forward(input_ids.shape, input_ids.device)


def accelerate_linear(model: nn.Module) -> nn.Module:
    """Run every ``nn.Linear`` of ``model`` (subclasses with their own forward, and layers whose forward
    someone else replaced, excepted) through :func:`switchcit.ops.linear`; returns ``model``.

    Instance-level and idempotent; :func:`restore_linear` undoes it. Under grad mode the layers run
    ``F.linear`` as before, so training is unchanged; with grad mode off, decode-sized CPU batches take the
    C++ kernel. The base layers of :class:`MultiLoraLinear` and of PEFT's LoRA layers are such layers.
    """
    for module in model.modules():
        if (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
                and "forward" not in module.__dict__):
            module.forward = types.MethodType(_linear_forward, module)
    return model


def restore_linear(model: nn.Module) -> nn.Module:
    """Undo :func:`accelerate_linear`: its layers get ``nn.Linear.forward`` back."""
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _linear_forward:
            del module.forward
    return model


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return linear(x, self.weight, self.bias)


def linear_features(base: nn.Module) -> tuple[int, int]:
    """``(in, out)`` of an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 stores its weight [in, out])."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        return base.weight.shape[0], base.nf
    raise TypeError(f"an adapter bank needs an nn.Linear or Conv1D base layer, got {type(base).__name__}")


class MultiLoraLinear(nn.Module):
    """A frozen base linear layer plus a bank of LoRA adapters, routed per token.

    ``lora_a [N, R, H]`` and ``lora_b [N, O, R]`` stack every adapter of the model's context (an
    adapter absent from this layer has rank 0); adapter ``i`` uses its first ``ranks[i]`` rows/cols
    and is scaled by ``scaling[i]`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
    """

    def __init__(self, base: nn.Module, context: RoutingContext | None = None):
        super().__init__()
        self.in_features, self.out_features = linear_features(base)
        self.base_layer = base.requires_grad_(False)
        self.context = context if context is not None else RoutingContext()
        weight = next(base.parameters())
        self.lora_a = nn.Parameter(weight.new_zeros(0, 0, self.in_features))
        self.lora_b = nn.Parameter(weight.new_zeros(0, self.out_features, 0))
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.int32, device=weight.device))
        self.register_buffer("scaling", torch.zeros(0, dtype=torch.float32, device=weight.device))
        self._grow(self.context.num_adapters, 0)

    @property
    def adapter_names(self) -> list[str]:
        """Adapters with weights in this layer."""
        return [n for i, n in enumerate(self.context.names)
                if n is not None and i < len(self.ranks) and self.ranks[i] > 0]

    def add_adapter(
        self, name: str, lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, *,
        rank: int | None = None, alpha: float | None = None, use_rslora: bool = False,
    ) -> int:
        """Add (or replace) adapter ``name``: given ``lora_a [r, H]`` and ``lora_b [O, r]``, or fresh
        weights of ``rank`` initialised as PEFT does (A Kaiming-uniform, B zero). Returns its id."""
        if lora_a is None:
            if rank is None or rank < 1:
                raise ValueError("give lora_a/lora_b, or a rank >= 1 for fresh weights")
            lora_a = torch.empty(rank, self.in_features, device=self.lora_a.device, dtype=self.lora_a.dtype)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            lora_b = lora_a.new_zeros(self.out_features, rank)
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, self.in_features) or lora_b is None or lora_b.shape != (self.out_features, rank):
            raise ValueError(
                f"adapter {name!r}: expected lora_a [r, {self.in_features}] and lora_b [{self.out_features}, r], "
                f"got {tuple(lora_a.shape)} and {None if lora_b is None else tuple(lora_b.shape)}"
            )
        index = self.context.add(name)
        alpha = rank if alpha is None else alpha
        self._grow(self.context.num_adapters, max(rank, self.lora_a.shape[1]))
        with torch.no_grad():
            self.lora_a[index].zero_()
            self.lora_b[index].zero_()
            self.lora_a[index, :rank] = lora_a
            self.lora_b[index, :, :rank] = lora_b
            self.ranks[index] = rank
            self.scaling[index] = alpha / (math.sqrt(rank) if use_rslora else rank)
        return index

    def remove_adapter(self, name: str) -> None:
        """Drop adapter ``name``'s weights from this layer (its id stays reserved)."""
        index = self.context.id_of(name)
        if index < len(self.ranks):
            with torch.no_grad():
                self.lora_a[index].zero_()
                self.lora_b[index].zero_()
                self.ranks[index] = 0

    def adapter_weights(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(lora_a [r, H], lora_b [O, r], scaling)`` of adapter ``name`` in this layer."""
        index = self.context.id_of(name)
        rank = int(self.ranks[index]) if index < len(self.ranks) else 0
        if rank == 0:
            raise KeyError(f"adapter {name!r} has no weights in this layer")
        return self.lora_a[index, :rank], self.lora_b[index, :, :rank], float(self.scaling[index])

    def _grow(self, num_adapters: int, max_rank: int) -> None:
        """Pad the bank to ``num_adapters`` × ``max_rank`` (new slots are zero, rank 0)."""
        old_n, old_r = self.lora_a.shape[0], self.lora_a.shape[1]
        if num_adapters <= old_n and max_rank <= old_r:
            return
        num_adapters, max_rank = max(num_adapters, old_n), max(max_rank, old_r)
        lora_a = self.lora_a.new_zeros(num_adapters, max_rank, self.in_features)
        lora_b = self.lora_b.new_zeros(num_adapters, self.out_features, max_rank)
        lora_a[:old_n, :old_r] = self.lora_a.detach()
        lora_b[:old_n, :, :old_r] = self.lora_b.detach()
        self.lora_a = nn.Parameter(lora_a, requires_grad=self.lora_a.requires_grad)
        self.lora_b = nn.Parameter(lora_b, requires_grad=self.lora_b.requires_grad)
        grow = num_adapters - old_n
        self.ranks = torch.cat([self.ranks, self.ranks.new_zeros(grow)])
        self.scaling = torch.cat([self.scaling, self.scaling.new_zeros(grow)])

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | RoutingPlan | None = None) -> torch.Tensor:
        """``adapter_ids``: per-token ids or a plan; by default the plan of the context's forward."""
        out = self.base_layer(x)
        routing = adapter_ids if adapter_ids is not None else self.context.plan
        if routing is None or self.lora_a.shape[1] == 0:
            return out
        self._grow(self.context.num_adapters, 0)  # adapters added to the model after this layer
        if isinstance(routing, RoutingPlan):  # the context's plan, checked once for all layers
            return add_bank_lora_(out, x, self.lora_a, self.lora_b, routing, self.scaling, self.ranks)
        return lora_delta(x, self.lora_a, self.lora_b, routing, self.scaling, out=out, ranks=self.ranks)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names}, "
                f"max_rank={self.lora_a.shape[1]}")
