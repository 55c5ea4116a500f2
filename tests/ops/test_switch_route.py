"""The switch op (``switch_route``): the fused Triton kernel (interpreter on CPU) against its PyTorch
reference, ``switchcit.ops.naive.route_reference``."""
import math

import pytest
import torch
from conftest import DEVICE

from switchcit.ops import build_routing_plan, switch_route
from switchcit.ops.naive import SwitchHead, classify_reference, gate_distance, pool_features, route_reference


def make_inputs(gen, batch, seq_len, features, hidden_units, tasks, components, dtype):
    hidden = torch.randn(batch, seq_len, features, generator=gen).to(dtype)
    embeddings = torch.randn(batch, seq_len, features, generator=gen).to(dtype)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    for row in range(batch):  # ragged lengths, left and right padding
        pad = int(torch.randint(0, seq_len, (), generator=gen))
        if row % 2:
            mask[row, :pad] = 0
        else:
            mask[row, seq_len - pad:] = 0

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    head = SwitchHead(
        feature_mean=randn(features, scale=0.1), feature_scale=torch.rand(features, generator=gen) + 0.5,
        w1=randn(hidden_units, features, scale=0.5), b1=randn(hidden_units, scale=0.5),
        w2=randn(tasks, hidden_units, scale=0.5), b2=randn(tasks, scale=0.5),
        gate_feature_mean=randn(features, scale=0.1), gate_feature_scale=torch.rand(features, generator=gen) + 0.5,
        class_means=randn(tasks, features), gate_components=randn(components, features, scale=features**-0.5),
        gate_scale=0.7, max_distance=math.inf, min_probability=0.0,
    )
    task_to_adapter = torch.randperm(tasks + 3, generator=gen)[:tasks].to(torch.int32)  # bank order differs
    task_to_adapter[0] = -1  # a task without an adapter routes to the base model
    return hidden, embeddings, mask, head, task_to_adapter


def split_between(values: torch.Tensor) -> float:
    """A threshold in the widest gap of ``values``: some rows pass, some fail, none sits on the edge."""
    values = values.sort().values
    if len(values) == 1:
        return float(values[0]) - 1e-3
    i = int((values[1:] - values[:-1]).argmax())
    return float(values[i] + values[i + 1]) / 2


def run_kernel(hidden, embeddings, mask, head, task_to_adapter, pool):
    return switch_route(hidden.to(DEVICE), embeddings.to(DEVICE), mask.to(DEVICE), head, task_to_adapter, pool,
                        backend="triton")


@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gate", ["probability", "distance", "open"])
# (B, S, D, hidden units, tasks, gate components): ragged sizes; S and D span several blocks; K = 0 and 128.
@pytest.mark.parametrize("shape", [(7, 19, 70, 200, 4, 9), (1, 1, 33, 24, 1, 0), (5, 40, 96, 50, 9, 128),
                                   (9, 3, 40, 32, 16, 17)], ids=str)
def test_fused_route_matches_reference(pool, dtype, gate, shape, generator):
    hidden, embeddings, mask, head, task_to_adapter = make_inputs(generator, *shape, dtype)
    features = pool_features(hidden.float(), mask, pool)
    gate_features = pool_features(embeddings.float(), mask, "mean")
    normalised = (features - head.feature_mean) / head.feature_scale
    logits = torch.relu(normalised @ head.w1.T + head.b1) @ head.w2.T + head.b2
    probability, task = torch.softmax(logits, 1).max(1)
    if gate == "probability":
        head.min_probability = split_between(probability)
    elif gate == "distance":
        gate_normalised = (gate_features - head.gate_feature_mean) / head.gate_feature_scale
        head.max_distance = split_between(gate_distance(gate_normalised, task, head.class_means, head.gate_components,
                                                        head.gate_scale))
    expected_seq, expected_tok = route_reference(hidden, embeddings, mask, head, task_to_adapter, pool)
    if gate != "open" and shape[0] > 1:
        assert (expected_seq == -1).any() and (classify_reference(features, gate_features, head) >= 0).any()

    sequence_ids, token_ids = run_kernel(hidden, embeddings, mask, head, task_to_adapter, pool)
    assert torch.equal(sequence_ids.cpu(), expected_seq)
    assert torch.equal(token_ids.cpu(), expected_tok)
    plan = build_routing_plan(token_ids.reshape(-1), int(task_to_adapter.max()) + 1)  # feeds the routing plan
    assert plan.num_tokens == shape[0] * shape[1]


def test_fused_route_empty_batch(generator):
    hidden, embeddings, mask, head, task_to_adapter = make_inputs(generator, 3, 5, 32, 16, 2, 4, torch.float32)
    sequence_ids, token_ids = run_kernel(hidden[:0], embeddings[:0], mask[:0], head, task_to_adapter, "last")
    assert sequence_ids.shape == (0,) and token_ids.shape == (0, 5)
