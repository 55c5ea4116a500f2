"""Bad input: a clear TypeError/ValueError before any kernel launch, and ``out`` left as it was."""
import pytest
import torch
from conftest import DEVICE
from helpers import make_problem

import switchcit.kernels
from switchcit import build_routing_plan, lora_delta, lora_linear


@pytest.fixture
def no_launch(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    for launcher in ("lora_shrink", "lora_expand", "lora_weight_grad"):
        monkeypatch.setattr(switchcit.kernels, launcher, launched)


def good(gen):
    return make_problem(gen, 10, 16, 12, 3, 4, dtype=torch.float32, device=DEVICE)


def replace(p, **changes):
    args = dict(x=p.x, lora_a=p.lora_a, lora_b=p.lora_b, adapter_ids=p.adapter_ids, scaling=p.scaling, ranks=p.ranks)
    args.update(changes)
    return args


CPU = torch.device("cpu")
OTHER = torch.device("meta")  # a second device that exists on every machine

BAD_INPUTS = {
    "id >= N": (ValueError, "adapter id 3", lambda p: replace(p, adapter_ids=torch.tensor([0] * 9 + [3], device=DEVICE))),
    "id < -1": (ValueError, "adapter id -2", lambda p: replace(p, adapter_ids=torch.tensor([-2] + [0] * 9, device=DEVICE))),
    "float ids": (TypeError, "int32 or int64", lambda p: replace(p, adapter_ids=p.adapter_ids.float())),
    "ids not a tensor": (TypeError, "torch.Tensor", lambda p: replace(p, adapter_ids=[0] * 10)),
    "too few ids": (ValueError, "one id per token", lambda p: replace(p, adapter_ids=p.adapter_ids[:9])),
    "ids wrong shape": (ValueError, "one id per token", lambda p: replace(p, adapter_ids=p.adapter_ids.reshape(2, 5))),
    "x hidden != lora_a": (ValueError, "hidden size", lambda p: replace(p, x=p.x[:, :15])),
    "lora_a not 3-D": (ValueError, "3-D", lambda p: replace(p, lora_a=p.lora_a[0])),
    "lora_b N mismatch": (ValueError, "does not match lora_a", lambda p: replace(p, lora_b=p.lora_b[:2])),
    "lora_b R mismatch": (ValueError, "does not match lora_a", lambda p: replace(p, lora_b=p.lora_b[..., :3])),
    "scaling wrong shape": (ValueError, "scaling must have shape", lambda p: replace(p, scaling=p.scaling[:2])),
    "scaling int tensor": (TypeError, "floating-point", lambda p: replace(p, scaling=torch.ones(3, dtype=torch.int64, device=DEVICE))),
    "scaling string": (TypeError, "scaling must be", lambda p: replace(p, scaling="1.0")),
    "ranks wrong shape": (ValueError, "ranks must have shape", lambda p: replace(p, ranks=p.ranks[:2])),
    "rank > R": (ValueError, r"ranks must lie in \[0, R=4\]", lambda p: replace(p, ranks=torch.tensor([4, 5, 1], device=DEVICE))),
    "negative rank": (ValueError, r"ranks must lie", lambda p: replace(p, ranks=torch.tensor([4, -1, 1], device=DEVICE))),
    "float ranks": (TypeError, "ranks must be int32 or int64", lambda p: replace(p, ranks=p.ranks.float())),
    "mixed dtypes": (TypeError, "lora_a has dtype", lambda p: replace(p, lora_a=p.lora_a.double())),
    "mixed devices": (ValueError, "lora_b is on meta", lambda p: replace(p, lora_b=p.lora_b.to(OTHER))),
    "ids on other device": (ValueError, "adapter_ids is on meta", lambda p: replace(p, adapter_ids=p.adapter_ids.to(OTHER))),
    "integer x": (TypeError, "floating-point", lambda p: replace(p, x=p.x.long())),
    "plan for other T": (ValueError, "routing plan is for 9 tokens", lambda p: replace(p, adapter_ids=build_routing_plan(p.adapter_ids[:9], 3))),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_lora_delta_rejects(name, backend, generator, no_launch):
    error, message, make_args = BAD_INPUTS[name]
    p = good(generator)
    out = torch.randn(10, 12, generator=generator).to(DEVICE)
    before = out.clone()
    with pytest.raises(error, match=message):
        lora_delta(**make_args(p), out=out, backend=backend)
    assert torch.equal(out, before), "a rejected call must not touch out"


@pytest.mark.parametrize(
    "name,error,message,change",
    [
        ("weight shape", ValueError, "weight", lambda p: dict(weight=p.weight[:, :15])),
        ("weight O", ValueError, "weight", lambda p: dict(weight=p.weight[:11])),
        ("weight dtype", TypeError, "weight has dtype", lambda p: dict(weight=p.weight.double())),
        ("bias shape", ValueError, "bias", lambda p: dict(bias=p.bias[:5])),
        ("bias device", ValueError, "bias is on meta", lambda p: dict(bias=p.bias.to(OTHER))),
    ],
)
def test_lora_linear_rejects(name, error, message, change, generator, no_launch):
    p = good(generator)
    args = dict(x=p.x, weight=p.weight, lora_a=p.lora_a, lora_b=p.lora_b, adapter_ids=p.adapter_ids,
                scaling=p.scaling, bias=p.bias, ranks=p.ranks, backend="triton")
    args.update(change(p))
    with pytest.raises(error, match=message):
        lora_linear(**args)


def test_out_mismatch_rejected(generator, no_launch):
    p = good(generator)
    with pytest.raises(ValueError, match="out has shape"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=torch.zeros(10, 13, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="out has dtype"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, out=torch.zeros(10, 12, dtype=torch.float64, device=DEVICE), backend="triton")


def test_triton_rejects_float64_and_cpu_without_interpreter(generator, monkeypatch, no_launch):
    p = make_problem(generator, 4, 8, 8, 2, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = make_problem(generator, 4, 8, 8, 2, 2)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lora_delta(q.x, q.lora_a, q.lora_b, q.adapter_ids, q.scaling, backend="triton")


def test_ranks_checked_once_and_again_after_in_place_change(generator):
    p = good(generator)
    lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend="torch")
    p.ranks[1] = 5  # > R = 4: the cached check must not hide it
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, R=4\]"):
        lora_delta(p.x, p.lora_a, p.lora_b, p.adapter_ids, p.scaling, ranks=p.ranks, backend="torch")
