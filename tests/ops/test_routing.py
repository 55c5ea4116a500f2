"""The routing plan: C++ counting sort vs the device path, the tile schedule's invariants, and plans
checked against their tensors."""
import dataclasses

import pytest
import torch
from conftest import DEVICE
from hypothesis import given
from hypothesis import strategies as st

from switchcit.ops import routing
from switchcit.ops.routing import RoutingPlan, build_routing_plan


def sort_with_torch(ids, num_adapters):
    return routing._sort_tokens_by_adapter(ids.reshape(-1), num_adapters)


def random_ids(gen, tokens, num_adapters, dtype=torch.int64):
    return torch.randint(-1, num_adapters, (tokens,), generator=gen).to(dtype)


@pytest.mark.parametrize("tokens,num_adapters", [(0, 3), (1, 1), (57, 5), (1000, 64), (300, 0)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
def test_cpp_sort_matches_device_path(tokens, num_adapters, id_dtype, generator):
    if routing._C is None:
        pytest.skip("C++ core not built")
    ids = (random_ids(generator, tokens, num_adapters, id_dtype) if num_adapters
           else torch.full((tokens,), -1, dtype=id_dtype))
    sorted_cpp, offsets_cpp = routing._C.sort_tokens_by_adapter(ids.numpy(), num_adapters)
    sorted_torch, offsets_torch = sort_with_torch(ids, num_adapters)
    assert torch.equal(torch.from_numpy(sorted_cpp), sorted_torch)
    assert torch.equal(torch.from_numpy(offsets_cpp), offsets_torch)


def test_cpp_sort_rejects_out_of_range_ids():
    if routing._C is None:
        pytest.skip("C++ core not built")
    with pytest.raises(ValueError, match="outside"):
        routing._C.sort_tokens_by_adapter(torch.tensor([0, 3]).numpy(), 3)
    with pytest.raises(TypeError, match="int32 or int64"):
        routing._C.sort_tokens_by_adapter(torch.tensor([0.0]).numpy(), 3)


def assert_plan_invariants(ids: torch.Tensor, plan: RoutingPlan) -> None:
    """``plan`` sorts the tokens of ``ids`` (CPU, any shape, values in [-1, N)) by adapter, and its tiles
    cover each adapter's rows once."""
    ids = ids.reshape(-1)
    tokens, num_adapters, block_m = ids.numel(), plan.num_adapters, plan.block_m
    sorted_ids = plan.sorted_token_ids.cpu().long()
    offsets = plan.adapter_offsets.cpu().long()
    assert torch.equal(plan.token_adapter.cpu(), ids)

    # Stable sort by adapter, base-only tokens last.
    keys = torch.where(ids < 0, num_adapters, ids)
    assert torch.equal(sorted_ids.sort().values, torch.arange(tokens))
    assert torch.equal(keys[sorted_ids], keys.sort(stable=True).values)
    assert torch.equal(sorted_ids, keys.sort(stable=True).indices)
    assert offsets[0] == 0 and offsets[-1] == tokens
    for a in range(num_adapters + 1):
        assert (keys[sorted_ids[offsets[a]:offsets[a + 1]]] == a).all()

    # Tiles: static count, each adapter's rows covered exactly once, idle tiles marked −1.
    tile_adapter = plan.tile_adapter.cpu().long()
    tile_start = plan.tile_start.cpu().long()
    assert tile_adapter.numel() == -(-tokens // block_m) + min(num_adapters, tokens)
    covered = torch.zeros(tokens, dtype=torch.long)
    for a, start in zip(tile_adapter.tolist(), tile_start.tolist()):
        if a < 0:
            continue
        end = min(start + block_m, int(offsets[a + 1]))
        assert offsets[a] <= start < end
        covered[start:end] += 1
    assert torch.equal(covered[: offsets[num_adapters]], torch.ones(int(offsets[num_adapters]), dtype=torch.long))
    assert (covered[offsets[num_adapters]:] == 0).all(), "base-only tokens get no tile"


@pytest.mark.parametrize("tokens,num_adapters,block_m",
                         [(0, 4, 16), (1, 4, 16), (77, 6, 16), (500, 9, 64), (200, 0, 16), (40, 64, 32)])
def test_plan_invariants(tokens, num_adapters, block_m, generator):
    ids = random_ids(generator, tokens, num_adapters) if num_adapters else torch.full((tokens,), -1)
    assert_plan_invariants(ids, build_routing_plan(ids.to(DEVICE), num_adapters, block_m=block_m, tiles=True))


@given(lead=st.lists(st.integers(0, 40), min_size=1, max_size=2), num_adapters=st.integers(0, 70),
       used=st.floats(0, 1), block_m=st.sampled_from([None, 16, 32, 64, 128]),
       id_dtype=st.sampled_from([torch.int32, torch.int64]), seed=st.integers(0, 2**31 - 1))
def test_property_routing_plan(lead, num_adapters, used, block_m, id_dtype, seed):
    """Any ids (some adapters unused, −1 anywhere), shape, bank size and tile height: the plan's invariants
    hold, the C++ and the device sort agree, and a plan rebuilt field by field passes its check."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, round(used * num_adapters), lead, generator=gen).to(id_dtype)
    plan = build_routing_plan(ids.to(DEVICE), num_adapters, block_m=block_m, tiles=True)
    assert_plan_invariants(ids, plan)
    sorted_token_ids, adapter_offsets = sort_with_torch(ids.to(DEVICE), num_adapters)
    assert torch.equal(plan.sorted_token_ids, sorted_token_ids) and torch.equal(plan.adapter_offsets, adapter_offsets)
    RoutingPlan(**{field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)})


def test_cpu_plan_uses_cpp_and_matches_torch_path(generator, monkeypatch):
    ids = random_ids(generator, 333, 7)
    fast = build_routing_plan(ids, 7, tiles=True)
    monkeypatch.setattr(routing, "_C", None)
    plain = build_routing_plan(ids, 7, tiles=True)
    for field in ("sorted_token_ids", "adapter_offsets", "tile_adapter", "tile_start"):
        assert torch.equal(getattr(fast, field), getattr(plain, field)), field


@pytest.mark.parametrize("bad", [[0, 5], [-2, 0]])
def test_plan_rejects_bad_ids(bad):
    with pytest.raises(ValueError, match=f"adapter id {bad[1] if bad[1] == 5 else bad[0]}"):
        build_routing_plan(torch.tensor(bad, device=DEVICE), 5)


def test_plan_rejects_float_ids_and_bad_block():
    with pytest.raises(TypeError, match="int32 or int64"):
        build_routing_plan(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="power of two"):
        build_routing_plan(torch.tensor([0, 1]), 3, block_m=24)


def test_unchecked_plan_routes_out_of_range_ids_to_base():
    """With checks off (graph capture, compile), bad ids must not reach the kernels as adapters."""
    sorted_ids, offsets = sort_with_torch(torch.tensor([7, 0, -5, 1]), 2)
    assert offsets.tolist() == [0, 1, 2, 4]  # adapter 0: token 1, adapter 1: token 3, base: tokens 0, 2
    assert sorted_ids.tolist() == [1, 3, 0, 2]


def test_tiles_are_built_on_demand(generator):
    ids = random_ids(generator, 90, 5)
    plan = build_routing_plan(ids, 5)
    assert plan.tile_adapter is None, "CPU plans skip the tile schedule the CPU kernels do not use"
    tiled = plan.with_tiles()
    eager = build_routing_plan(ids, 5, tiles=True)
    assert torch.equal(tiled.tile_adapter, eager.tile_adapter) and torch.equal(tiled.tile_start, eager.tile_start)
    assert tiled.with_tiles() is tiled


def other_plan(plan: RoutingPlan) -> RoutingPlan:
    """A plan of the same sizes for other ids: adapter 0's tokens moved to adapter 1 (so every tensor differs)."""
    ids = torch.where(plan.token_adapter == 0, 1, plan.token_adapter)
    return build_routing_plan(ids, plan.num_adapters, block_m=plan.block_m, tiles=True)


# Changes to a good plan (40 tokens, 5 adapters, 16-row tiles) that make a field disagree with a tensor.
BAD_PLANS = {
    "num_tokens": (r"token_adapter has shape \(40,\), expected \(41,\)", lambda plan: dict(num_tokens=41)),
    "num_adapters": (r"adapter_offsets has shape \(7,\), expected \(8,\)", lambda plan: dict(num_adapters=6)),
    "block_m": ("block_m must be a power of two", lambda plan: dict(block_m=24)),
    "tiles of other block_m": (r"tile_adapter has shape \(8,\), expected \(7,\)", lambda plan: dict(block_m=32)),
    "float ids": ("token_adapter must be int32 or int64", lambda plan: dict(token_adapter=plan.token_adapter.float())),
    "int64 sorted ids": ("sorted_token_ids must be int32",
                         lambda plan: dict(sorted_token_ids=plan.sorted_token_ids.long())),
    "2-D offsets": (r"adapter_offsets has shape \(1, 7\)",
                    lambda plan: dict(adapter_offsets=plan.adapter_offsets[None])),
    "one tile tensor": ("tile_adapter and tile_start", lambda plan: dict(tile_start=None)),
    "other device": ("sorted_token_ids is on meta",
                     lambda plan: dict(sorted_token_ids=plan.sorted_token_ids.to("meta"))),
    "sorted ids of other ids": ("not the plan of its token_adapter",
                                lambda plan: dict(sorted_token_ids=plan.sorted_token_ids.flip(0))),
    "offsets of other ids": ("not the plan of its token_adapter",
                             lambda plan: dict(adapter_offsets=other_plan(plan).adapter_offsets)),
    "tiles of other ids": ("not the plan of its token_adapter",
                           lambda plan: dict(tile_adapter=other_plan(plan).tile_adapter)),
    "ids of another plan": ("not the plan of its token_adapter",
                            lambda plan: dict(token_adapter=other_plan(plan).token_adapter)),
}


@pytest.mark.parametrize("name", list(BAD_PLANS))
def test_plan_fields_checked_against_its_tensors(name, generator):
    message, change = BAD_PLANS[name]
    ids = random_ids(generator, 40, 5)
    ids[:5] = torch.arange(5)  # adapter 0 has tokens, so other_plan differs in every tensor
    plan = build_routing_plan(ids.to(DEVICE), 5, block_m=16, tiles=True)
    with pytest.raises((ValueError, TypeError), match=message):
        dataclasses.replace(plan, **change(plan))
    fields = {field.name: getattr(plan, field.name) for field in dataclasses.fields(plan)}
    with pytest.raises((ValueError, TypeError), match=message):
        RoutingPlan(**{**fields, **change(plan)})


def test_hand_built_plan_equal_to_the_built_one_is_accepted(generator):
    plan = build_routing_plan(random_ids(generator, 40, 5).to(DEVICE), 5, tiles=True)
    fields = {field.name: getattr(plan, field.name).clone() if isinstance(getattr(plan, field.name), torch.Tensor)
              else getattr(plan, field.name) for field in dataclasses.fields(plan)}
    copy = RoutingPlan(**fields)
    assert torch.equal(copy.sorted_token_ids, plan.sorted_token_ids)
