"""The public ops against the float64 reference: Triton (interpreter on CPU, compiled on CUDA) and torch."""
import pytest
import torch
from conftest import DEVICE, assert_close_to_reference
from helpers import make_problem

from switchcit import build_routing_plan, lora_delta, lora_linear
from switchcit.kernels import LoraKernelConfig, lora_expand, lora_shrink
from switchcit.ops.naive import lora_delta_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (T, H, O, N, R, ids): ragged sizes that are no multiple of any block, and the edge cases.
CASES = [
    (37, 70, 53, 5, 12, "random"),
    (1, 33, 17, 3, 8, "random"),
    (0, 40, 24, 3, 8, "random"),
    (130, 48, 40, 4, 16, "skip_some"),  # adapters with no tokens; T > 128 takes 64-row tiles
    (29, 24, 31, 4, 8, "all_base"),
    (45, 36, 20, 6, 20, "one_adapter"),
    (19, 64, 96, 1, 64, "random"),
]


def case_id(case):
    return "T{}-H{}-O{}-N{}-R{}-{}".format(*case)


def test_reference_matches_per_token_formula(generator):
    p = make_problem(generator, 23, 9, 7, 4, 5, dtype=torch.float64)
    got = lora_delta_reference(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, p.ranks)
    for t in range(p.x.shape[0]):
        a = int(p.adapter_ids[t])
        if a < 0:
            assert torch.equal(got[t], torch.zeros_like(got[t]))
            continue
        r = int(p.ranks[a])
        expected = p.scaling[a] * sum(
            (p.x[t] @ p.lora_a[a, k]) * p.lora_b[a, :, k] for k in range(r)
        ) if r else torch.zeros_like(got[t])
        torch.testing.assert_close(got[t], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_lora_delta_adds_into_out(case, dtype, generator):
    tokens, hidden, out_features, num_adapters, max_rank, ids = case
    p = make_problem(generator, tokens, hidden, out_features, num_adapters, max_rank, ids=ids, dtype=dtype, device=DEVICE)
    out = torch.randn(tokens, out_features, generator=generator).to(dtype).to(DEVICE)  # poisoned, not zeros
    before = out.clone()
    result = lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=out, ranks=p.ranks, backend="triton")
    assert result is out
    expected = before.double() + p.reference_delta()
    assert_close_to_reference(out, expected, dtype)
    base_rows = p.adapter_ids == -1
    assert torch.equal(out[base_rows], before[base_rows]), "base-only tokens must be left untouched"


@pytest.mark.parametrize("case", CASES[:3], ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_lora_linear(case, dtype, generator):
    tokens, hidden, out_features, num_adapters, max_rank, ids = case
    p = make_problem(generator, tokens, hidden, out_features, num_adapters, max_rank, ids=ids, dtype=dtype, device=DEVICE)
    got = lora_linear(p.x, p.weight, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, bias=p.bias, ranks=p.ranks, backend="triton")
    base = torch.nn.functional.linear(p.x.double(), p.weight.double(), p.bias.double())
    assert_close_to_reference(got, base + p.reference_delta(), dtype)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("tensor_scaling", [True, False], ids=["tensor-scaling", "float-scaling"])
@pytest.mark.parametrize("ranks", [True, False], ids=["ranks", "full-rank"])
def test_triton_id_dtypes_scalings_and_ranks(id_dtype, tensor_scaling, ranks, generator):
    p = make_problem(generator, 41, 50, 27, 5, 12, dtype=torch.float32, device=DEVICE, id_dtype=id_dtype,
                     tensor_scaling=tensor_scaling, heterogeneous_ranks=ranks)
    got = lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend="triton")
    assert_close_to_reference(got, p.reference_delta(), torch.float32)


def test_triton_non_contiguous_inputs_and_leading_dims(generator):
    p = make_problem(generator, 24, 40, 36, 4, 8, dtype=torch.float32, device=DEVICE)
    x = p.x.reshape(2, 12, 40).transpose(0, 1)  # [12, 2, H], non-contiguous
    ids = p.adapter_ids.reshape(2, 12).transpose(0, 1)  # one id per token of x, same layout
    lora_a = p.lora_a.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    lora_b = torch.cat([p.lora_b, p.lora_b], dim=1)[:, ::2]  # [N, O, R] strided view
    assert not (x.is_contiguous() or lora_a.is_contiguous() or lora_b.is_contiguous())
    out = torch.randn(36, 2, 12, generator=generator).to(DEVICE).permute(2, 1, 0)  # [12, 2, O], no 2-D view
    before = out.clone()
    lora_delta(x, lora_a, lora_b, ids, p.scaling, out=out, ranks=p.ranks, backend="triton")

    flat_ids = ids.reshape(-1)
    expected = lora_delta_reference(x.reshape(-1, 40).double(), lora_a.double(), lora_b.double(), flat_ids,
                                    p.scaling.double(), p.ranks)
    assert_close_to_reference(out, before.double() + expected.reshape(12, 2, 36), torch.float32)


@pytest.mark.parametrize("split_k", [1, 2, 5])
@pytest.mark.parametrize("block_m", [16, 32])
def test_kernel_configs_agree(split_k, block_m, generator):
    """Split-K (the decode path) and tile sizes change the schedule, never the result."""
    p = make_problem(generator, 50, 130, 70, 6, 24, dtype=torch.float32, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 6, block_m=block_m, tiles=True)
    out = torch.randn(50, 70, generator=generator).to(DEVICE)
    before = out.clone()
    config = LoraKernelConfig(block_n=32, block_k=16, split_k=split_k)
    partial = lora_shrink(p.x, p.lora_a, plan, p.ranks, config)
    assert partial.shape[0] == min(split_k, -(-130 // 16))
    lora_expand(out, partial, p.lora_b, plan, p.scaling, 1.0, p.ranks, config)
    assert_close_to_reference(out, before.double() + p.reference_delta(), torch.float32)


def test_plan_reused_across_layers(generator):
    """One plan per forward serves every layer, whatever its shapes."""
    p = make_problem(generator, 33, 24, 40, 3, 8, dtype=torch.float32, device=DEVICE)
    plan = build_routing_plan(p.adapter_ids, 3)
    hidden = lora_linear(p.x, p.weight, p.lora_a, p.lora_b, plan, p.scaling, bias=p.bias, ranks=p.ranks, backend="triton")
    q = make_problem(generator, 33, 40, 24, 3, 8, dtype=torch.float32, device=DEVICE)
    got = lora_delta(hidden, q.lora_a, q.lora_b, plan, q.scaling, ranks=q.ranks, backend="triton")
    expected = lora_delta_reference(hidden.double(), q.lora_a.double(), q.lora_b.double(), p.adapter_ids,
                                    q.scaling.double(), q.ranks)
    assert_close_to_reference(got, expected, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_torch_backend_float64(case, generator):
    tokens, hidden, out_features, num_adapters, max_rank, ids = case
    p = make_problem(generator, tokens, hidden, out_features, num_adapters, max_rank, ids=ids, dtype=torch.float64)
    out = torch.randn(tokens, out_features, generator=generator, dtype=torch.float64)
    expected = out + p.reference_delta()
    lora_delta(p.x, p.lora_a, p.lora_b, build_routing_plan(p.adapter_ids, num_adapters), p.scaling, out=out,
               ranks=p.ranks, backend="torch")
    assert_close_to_reference(out, expected, torch.float64)


def test_auto_backend_and_env_override(monkeypatch, generator):
    from switchcit.ops import select_backend

    x = torch.zeros(2, 4, dtype=torch.float64)
    monkeypatch.delenv("SWITCHCIT_BACKEND", raising=False)
    assert select_backend(None, x) == "torch"
    monkeypatch.setenv("SWITCHCIT_BACKEND", "triton")
    with pytest.raises(TypeError, match="float64"):
        select_backend(None, x)
    assert select_backend("torch", x) == "torch"  # an explicit argument wins over the environment
    monkeypatch.setenv("SWITCHCIT_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend(None, x)
    if torch.cuda.is_available():
        monkeypatch.delenv("SWITCHCIT_BACKEND")
        assert select_backend(None, x.float().cuda()) == "triton"
