"""The fused switch kernel (Triton; interpreter on CPU) against its PyTorch reference."""
import pytest
import torch
from conftest import DEVICE

from switchcit.kernels import fused_switch_route
from switchcit.routing import build_routing_plan
from switchcit.switch import route_reference


def make_inputs(gen, batch, seq_len, features, hidden_units, tasks, dtype):
    hidden = torch.randn(batch, seq_len, features, generator=gen).to(dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    for row in range(batch):  # ragged lengths, left and right padding
        pad = int(torch.randint(0, seq_len, (), generator=gen))
        if row % 2:
            mask[row, :pad] = 0
        else:
            mask[row, seq_len - pad:] = 0
    mlp = torch.nn.Sequential(torch.nn.Linear(features, hidden_units), torch.nn.ReLU(), torch.nn.Linear(hidden_units, tasks))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    mean = torch.randn(features, generator=gen) * 0.1
    scale = torch.rand(features, generator=gen) + 0.5
    task_to_adapter = torch.randperm(tasks + 3, generator=gen)[:tasks].to(torch.int32)  # bank order differs
    return hidden, mask, mlp, mean, scale, task_to_adapter


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 19, 70, 200, 4), (1, 1, 33, 24, 1), (12, 40, 96, 50, 9), (96, 3, 40, 32, 16)], ids=str)
def test_fused_route_matches_reference(pool, dtype, shape, generator):
    hidden, mask, mlp, mean, scale, task_to_adapter = make_inputs(generator, *shape, dtype)
    with torch.no_grad():
        probability = torch.softmax(mlp((route_pool(hidden, mask, pool) - mean) / scale), 1).max(1).values
    threshold = threshold_between(probability)  # some rows above, some below, none on the edge
    expected_seq, expected_tok = route_reference(hidden, mask, mean, scale, mlp, task_to_adapter, threshold, pool)
    (w1, b1), (w2, b2) = ((layer.weight.detach(), layer.bias.detach()) for layer in (mlp[0], mlp[2]))
    args = [t.to(DEVICE) for t in (hidden, mask, mean, scale, w1, b1, w2, b2, task_to_adapter)]
    sequence_ids, token_ids = fused_switch_route(*args, threshold, pool == "last")
    assert torch.equal(sequence_ids.cpu(), expected_seq)
    assert torch.equal(token_ids.cpu(), expected_tok)
    plan = build_routing_plan(token_ids.reshape(-1), int(task_to_adapter.max()) + 1)  # feeds the routing plan
    assert plan.num_tokens == shape[0] * shape[1]


def route_pool(hidden, mask, pool):
    from switchcit.switch import pool_features

    return pool_features(hidden.float(), mask, pool)


def threshold_between(probability):
    values = probability.sort().values
    if len(values) == 1:
        return float(values[0]) - 1e-3
    gaps = values[1:] - values[:-1]
    i = int(gaps.argmax())
    return float(values[i] + values[i + 1]) / 2
