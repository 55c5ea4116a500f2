"""PyTorch modules: a shared routing context and the adapter-bank linear layer.

A model holds one :class:`RoutingContext`. Before a forward (or a whole ``generate``), the caller
sets one adapter per sequence (``context.route(...)``); the first adapter-bank layer of the forward
expands that into the per-token :class:`~switchcit.routing.RoutingPlan`, and every other layer with
the same token shape reuses it — prefill and each decode step get their plan once.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from switchcit.ops import lora_delta
from switchcit.routing import RoutingPlan, build_routing_plan

__all__ = ["BASE", "RoutingContext", "MultiLoraLinear", "linear_features"]

BASE = "__base__"  # PEFT's name for "no adapter"; id −1


class RoutingContext:
    """Adapter names ↔ ids for a model, and the routing plan of the current forward.

    Ids are stable: adding an adapter appends, removing one leaves its id unused, so plans and banks
    built earlier stay valid.
    """

    def __init__(self, names: Sequence[str] = ()):
        self.names: list[str | None] = []  # None marks a removed adapter
        self._sequence_ids: torch.Tensor | None = None
        self._routed_names: list[str] | None = None  # the adapter_names list the ids came from
        self._plans: dict[tuple, RoutingPlan] = {}
        for name in names:
            self.add(name)

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    def id_of(self, name: str) -> int:
        if name == BASE:
            return -1
        try:
            return self.names.index(name)
        except ValueError:
            known = [n for n in self.names if n is not None]
            raise KeyError(f"unknown adapter {name!r}; loaded: {known} (or {BASE!r} for the base model)") from None

    def add(self, name: str) -> int:
        if not isinstance(name, str) or not name or name == BASE:
            raise ValueError(f"adapter name must be a non-empty string other than {BASE!r}, got {name!r}")
        if name in self.names:
            return self.names.index(name)
        self.names.append(name)
        self._plans.clear()  # plans are built for a number of adapters
        return len(self.names) - 1

    def remove(self, name: str) -> int:
        index = self.id_of(name)
        self.names[index] = None
        return index

    def route(self, adapters: torch.Tensor | Sequence[str | int | None] | None, device=None) -> None:
        """Set one adapter per sequence for the following forwards: names, ids (−1 or ``None`` = base
        model), or a tensor of ids. ``None`` routes every token to the base model."""
        if adapters is None:
            ids = None
        elif isinstance(adapters, torch.Tensor):
            ids = adapters.reshape(-1)
            if ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter ids must be int32 or int64, got {ids.dtype}")
        else:
            ids = torch.tensor([self._to_id(a) for a in adapters], dtype=torch.int64, device=device)
        self._sequence_ids, self._routed_names = ids, None
        self._plans.clear()

    def route_names(self, adapter_names: Sequence[str], device) -> None:
        """``route`` for PEFT's ``adapter_names`` (already checked against the model by PEFT, so new
        names join the context); skipped when the list is unchanged, as every layer of a forward
        receives the same list."""
        if self._routed_names is not None and self._routed_names == adapter_names:
            return
        ids = [-1 if name == BASE else self.add(name) for name in adapter_names]
        self.route(torch.tensor(ids, dtype=torch.int64, device=device))
        self._routed_names = list(adapter_names)

    def _to_id(self, adapter: str | int | None) -> int:
        if adapter is None:
            return -1
        if isinstance(adapter, str):
            return self.id_of(adapter)
        if isinstance(adapter, bool) or not isinstance(adapter, int):
            raise TypeError(f"an adapter is a name, an id or None, got {adapter!r}")
        if not -1 <= adapter < self.num_adapters:
            raise ValueError(f"adapter id {adapter} is outside [-1, {self.num_adapters})")
        return adapter

    def plan_for(self, x: torch.Tensor) -> RoutingPlan | None:
        """The plan for input ``x [B, S, H]`` (or ``[T, H]`` with one id per token); ``None`` if every
        token goes to the base model."""
        ids = self._sequence_ids
        if ids is None:
            return None
        key = (tuple(x.shape[:-1]), x.device)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_routing_plan(self._token_ids(ids.to(x.device), x), self.num_adapters)
            self._plans[key] = plan
        return plan

    @staticmethod
    def _token_ids(sequence_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence ids → per-token ids for ``x [B, S, H]`` (also B = k × sequences, as beam
        search and ``num_return_sequences`` repeat each sequence k times)."""
        batch, sequences = x.shape[0], sequence_ids.numel()
        if x.dim() == 2 and batch == sequences:
            return sequence_ids  # already one id per token
        if sequences == 0 or batch % sequences:
            raise ValueError(f"{sequences} routed sequences do not fit a batch of {batch}")
        tokens_per_row = math.prod(x.shape[1:-1])
        return sequence_ids.repeat_interleave((batch // sequences) * tokens_per_row)


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
        return [n for i, n in enumerate(self.context.names) if n is not None and i < len(self.ranks) and self.ranks[i] > 0]

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
        """``adapter_ids``: per-token ids or a plan; by default the context's plan for this forward."""
        out = self.base_layer(x)
        routing = adapter_ids if adapter_ids is not None else self.context.plan_for(x)
        if routing is None or self.lora_a.shape[1] == 0:
            return out
        self._grow(self.context.num_adapters, 0)  # adapters added to the model after this layer
        return lora_delta(x, self.lora_a, self.lora_b, routing, self.scaling, out=out, ranks=self.ranks)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, adapters={self.adapter_names}, max_rank={self.lora_a.shape[1]}"
