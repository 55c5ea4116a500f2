"""Routing plan: which sorted rows each adapter owns, built once per forward and shared by every layer.

Given per-token adapter ids (−1 = base model only), the plan holds

* ``sorted_token_ids [T]``: token indices stably sorted by adapter, base-only tokens last;
* ``adapter_offsets [N + 2]``: adapter ``a`` owns sorted positions
  ``adapter_offsets[a] : adapter_offsets[a + 1]`` (bucket ``N`` holds the base-only tokens);
* a tile schedule for the Triton kernels: tile ``i`` covers up to ``block_m`` sorted rows of adapter
  ``tile_adapter[i]`` starting at ``tile_start[i]`` (``tile_adapter[i] = −1``: nothing to do).

Every shape depends only on ``T``, ``N`` and ``block_m`` — never on the ids' values — so building
the plan on the GPU needs no host synchronisation and a forward using it can be captured in a CUDA
graph. The number of tiles is bounded by ``ceil(T / block_m) + min(N, T)`` (each adapter adds at most
one partial tile); tiles past the real count are marked −1 and their programs exit at once.
"""
from __future__ import annotations

from dataclasses import InitVar, dataclass, replace

import torch

from switchcit.ops.cpp import _C

__all__ = ["RoutingPlan", "build_routing_plan", "default_block_m", "check_adapter_ids"]


def default_block_m(num_tokens: int) -> int:
    """Rows per tile: small tiles for decode-sized batches (few tokens per adapter), larger for prefill."""
    return 16 if num_tokens <= 128 else 64


@dataclass(frozen=True)
class RoutingPlan:
    """Build it with :func:`build_routing_plan`. A plan made any other way (by hand, ``dataclasses.replace``)
    is checked against its tensors: shapes, dtypes and device always, and, where its values may be read
    (:func:`may_read_values`; on CUDA that syncs once), that it is the plan of its ``token_adapter``."""

    num_tokens: int
    num_adapters: int
    block_m: int
    token_adapter: torch.Tensor  # [T], the ids as given (flattened)
    sorted_token_ids: torch.Tensor  # int32 [T]
    adapter_offsets: torch.Tensor  # int32 [N + 2]
    tile_adapter: torch.Tensor | None  # int32 [max_tiles], −1 = idle tile (None: not built)
    tile_start: torch.Tensor | None  # int32 [max_tiles], first sorted row of the tile
    # Set by build_routing_plan, whose plans are right by construction: checking their values again
    # would read them on the host in every forward.
    _built: InitVar[bool] = False

    def __post_init__(self, _built: bool) -> None:
        _check_plan_tensors(self)
        if not _built:
            _check_plan_values(self)

    @property
    def device(self) -> torch.device:
        return self.sorted_token_ids.device

    def with_tiles(self) -> RoutingPlan:
        """This plan with its tile schedule (the Triton kernels need it, the CPU kernels do not)."""
        if self.tile_adapter is not None:
            return self
        tile_adapter, tile_start = _tile_schedule(self.adapter_offsets, self.num_tokens, self.num_adapters,
                                                  self.block_m)
        return replace(self, tile_adapter=tile_adapter, tile_start=tile_start, _built=True)  # self was checked

    def adapter_counts(self) -> torch.Tensor:
        """Tokens per adapter, ``[N]`` (on the plan's device; no sync)."""
        return (self.adapter_offsets[1:-1] - self.adapter_offsets[:-2]).to(torch.int64)


def check_adapter_ids(adapter_ids: torch.Tensor, num_adapters: int) -> None:
    """Type check always; value check (−1 ≤ id < N) unless it would need a sync we may not do."""
    if not isinstance(adapter_ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(adapter_ids).__name__}")
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_ids must be int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.numel() == 0 or not may_read_values(adapter_ids):
        return
    low, high = torch.aminmax(adapter_ids)
    low, high = int(low), int(high)
    if low < -1 or high >= num_adapters:
        bad = low if low < -1 else high
        raise ValueError(
            f"adapter id {bad} is outside [-1, {num_adapters}) for a bank of {num_adapters} adapters "
            "(-1 means base model only)"
        )


def _check_plan_tensors(plan: RoutingPlan) -> None:
    """Shapes, dtypes and device of the plan's tensors against its sizes (no host read of values)."""
    _check_block_m(plan.block_m)
    if (plan.tile_adapter is None) != (plan.tile_start is None):
        raise ValueError("tile_adapter and tile_start come together: both tensors, or both None")
    tokens, adapters = plan.num_tokens, plan.num_adapters
    expected = {"token_adapter": ((tokens,), (torch.int32, torch.int64)),
                "sorted_token_ids": ((tokens,), (torch.int32,)), "adapter_offsets": ((adapters + 2,), (torch.int32,))}
    if plan.tile_adapter is not None:
        tiles = (_max_tiles(tokens, adapters, plan.block_m),)
        expected.update(tile_adapter=(tiles, (torch.int32,)), tile_start=(tiles, (torch.int32,)))
    for name, (shape, dtypes) in expected.items():
        t = getattr(plan, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            names = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
            raise TypeError(f"{name} must be {names}, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"routing plan for {tokens} tokens, {adapters} adapters and block_m {plan.block_m}: "
                f"{name} has shape {tuple(t.shape)}, expected {shape}"
            )
        if t.device != plan.token_adapter.device:
            raise ValueError(f"{name} is on {t.device} but token_adapter is on {plan.token_adapter.device}")


def _check_plan_values(plan: RoutingPlan) -> None:
    """A plan not made by build_routing_plan must be the one it makes of the same ids."""
    if not may_read_values(plan.token_adapter):
        return
    rebuilt = build_routing_plan(plan.token_adapter, plan.num_adapters, block_m=plan.block_m, validate=False,
                                 tiles=plan.tile_adapter is not None)
    for name in ("sorted_token_ids", "adapter_offsets", "tile_adapter", "tile_start"):
        if getattr(plan, name) is not None and not torch.equal(getattr(plan, name), getattr(rebuilt, name)):
            raise ValueError(
                f"the routing plan's {name} is not the plan of its token_adapter; build plans with build_routing_plan"
            )


def may_read_values(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host is allowed now."""
    # Reading a CUDA tensor's values syncs the host; during graph capture or compilation we skip the
    # check, and the plan maps out-of-range ids to "base only" so kernels stay memory-safe.
    if torch.compiler.is_compiling() or t.is_meta:
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def build_routing_plan(
    adapter_ids: torch.Tensor,
    num_adapters: int,
    *,
    block_m: int | None = None,
    validate: bool = True,
    tiles: bool | None = None,
) -> RoutingPlan:
    """Build the routing plan for one forward. ``adapter_ids``: int32/int64, any shape (flattened).
    ``tiles``: also build the tile schedule; by default only for CUDA ids (the CPU kernels walk the
    adapter segments directly, and :meth:`RoutingPlan.with_tiles` adds it later if needed)."""
    if validate:
        check_adapter_ids(adapter_ids, num_adapters)
    ids = adapter_ids.reshape(-1)
    num_tokens = ids.numel()
    if block_m is None:
        block_m = default_block_m(num_tokens)
    _check_block_m(block_m)

    if ids.device.type == "cpu" and _C is not None and not torch.compiler.is_compiling():
        sorted_ids, offsets = _C.sort_tokens_by_adapter(ids.numpy(), num_adapters)
        sorted_token_ids, adapter_offsets = torch.from_numpy(sorted_ids), torch.from_numpy(offsets)
    else:
        sorted_token_ids, adapter_offsets = _sort_tokens_by_adapter(ids, num_adapters)

    plan = RoutingPlan(
        num_tokens=num_tokens,
        num_adapters=num_adapters,
        block_m=block_m,
        token_adapter=ids,
        sorted_token_ids=sorted_token_ids,
        adapter_offsets=adapter_offsets,
        tile_adapter=None,
        tile_start=None,
        _built=True,
    )
    return plan.with_tiles() if (ids.is_cuda if tiles is None else tiles) else plan


def _check_block_m(block_m: int) -> None:
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")


def _max_tiles(num_tokens: int, num_adapters: int, block_m: int) -> int:
    """Tiles of the schedule: each adapter adds at most one partial tile to ceil(T / block_m)."""
    return -(-num_tokens // block_m) + min(num_adapters, num_tokens)


def _sort_tokens_by_adapter(ids: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device path: stable sort + searchsorted (bincount would sync on CUDA to size its output)."""
    keys = ids.to(torch.int64)
    keys = torch.where((keys >= 0) & (keys < num_adapters), keys, num_adapters)
    sorted_keys, order = torch.sort(keys, stable=True)
    buckets = torch.arange(num_adapters + 2, device=ids.device)
    offsets = torch.searchsorted(sorted_keys, buckets)
    return order.to(torch.int32), offsets.to(torch.int32)


def _tile_schedule(
    adapter_offsets: torch.Tensor, num_tokens: int, num_adapters: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = adapter_offsets.device
    offsets = adapter_offsets.to(torch.int64)
    counts = offsets[1 : num_adapters + 1] - offsets[:num_adapters]
    tiles_per_adapter = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles_per_adapter, 0)
    tile_begin = torch.cat([tile_end.new_zeros(1), tile_end])  # [N + 1]; index N is never valid

    tile = torch.arange(_max_tiles(num_tokens, num_adapters, block_m), device=device)
    adapter = torch.searchsorted(tile_end, tile, right=True)  # N for tiles past the last one
    idle = adapter >= num_adapters
    adapter = torch.where(idle, 0, adapter)
    start = offsets[adapter] + (tile - tile_begin[adapter]) * block_m
    tile_adapter = torch.where(idle, -1, adapter).to(torch.int32)
    tile_start = torch.where(idle, 0, start).to(torch.int32)
    return tile_adapter, tile_start
