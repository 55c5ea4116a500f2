"""Grouped-query attention (query heads sharing one read of their keys) and the engine's slot attention
(a flattened step: decode tokens and prompt tokens, each over its own slot of the cache) against
softmax attention with the keys repeated, in float64, on strided slot views with ragged lengths; and a
transformers model that uses it computes and generates what it did before."""
import pytest
import torch
from helpers import tiny_llama_batch

from switchcit.ops.attention import ATTENTION, SlotBatch, accelerate_attention, grouped_attention, slot_attention
from switchcit.ops.naive import attention_reference


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_grouped_attention_equals_the_reference_on_strided_slots_with_ragged_lengths(heads, kv_heads, generator):
    batch, dim, slots, positions = 5, 16, 7, 48
    lengths = torch.tensor([1, 17, 40, 3, 29])  # each row's cached tokens; the step attends to max(lengths)
    width = int(lengths.max())
    cache = torch.randn(2, slots, positions, kv_heads, dim, generator=generator, dtype=torch.float64)
    key, value = (c[:batch, :width].transpose(1, 2) for c in cache)  # [B, KVH, L, D] views, as the engine's
    assert not key.is_contiguous()
    query = torch.randn(batch, heads, 1, dim, generator=generator, dtype=torch.float64)
    mask = torch.zeros(batch, 1, 1, width, dtype=torch.float64)
    mask[torch.arange(width)[None, None, None, :] >= lengths[:, None, None, None]] = torch.finfo(torch.float64).min
    expected = attention_reference(query, key, value, mask, dim ** -0.5)
    torch.testing.assert_close(grouped_attention(query, key, value, mask, dim ** -0.5), expected)
    torch.testing.assert_close(grouped_attention(query, key, value, mask == 0, dim ** -0.5), expected)  # bool mask
    torch.testing.assert_close(grouped_attention(query, key, value, None, 0.3),
                               attention_reference(query, key, value, None, 0.3))
    # A row attends to its own length only: what lies beyond it in the slot does not matter.
    cache[:, 0, 1:] = 1e3
    torch.testing.assert_close(grouped_attention(query, key, value, mask, dim ** -0.5)[0], expected[0])
    # Several query tokens per row (a prompt), each with its own causal row of the mask.
    queries = torch.randn(batch, heads, 6, dim, generator=generator, dtype=torch.float64)
    causal = torch.zeros(batch, 1, 6, width, dtype=torch.float64)
    causal[torch.arange(width) > lengths[:, None, None, None] - 6 + torch.arange(6)[:, None]] = -1e300
    torch.testing.assert_close(grouped_attention(queries, key, value, causal, 0.2),
                               attention_reference(queries, key, value, causal, 0.2))


@pytest.mark.parametrize("decode_positions, prompt_positions, prompt_slot", [
    ([4, 0, 17], [(0, 5), (3, 4), (2, 11)], 3),  # decode and prompts; prompts after a prefix of 3 and 2
    ([], [(0, 1), (0, 9)], 2),  # prompts only, in slots after live ones that do not decode
    ([6, 30], [], 2),  # decode only
])
def test_slot_attention_lets_each_token_see_its_own_slot_up_to_its_position(
        decode_positions, prompt_positions, prompt_slot, generator):
    heads, kv_heads, dim, slots, capacity = 6, 2, 8, 6, 40
    keys, values = torch.randn(2, slots, kv_heads, capacity, dim, generator=generator, dtype=torch.float64)
    token_slots = list(range(len(decode_positions))) + [
        prompt_slot + row for row, (start, end) in enumerate(prompt_positions) for _ in range(start, end)]
    positions = decode_positions + [p for start, end in prompt_positions for p in range(start, end)]
    query = torch.randn(1, heads, len(positions), dim, generator=generator, dtype=torch.float64)
    batch = SlotBatch.build(decode_positions, prompt_positions, prompt_slot, torch.float64, torch.device("cpu"))
    assert batch.token_mask.shape == (1, 1, len(positions), max(positions) + 1)
    assert batch.slots.tolist() == token_slots and batch.positions.tolist() == positions  # where the cache writes
    got = slot_attention(query, keys, values, batch, 0.3)
    for token, (slot, position) in enumerate(zip(token_slots, positions)):  # one token at a time, its slot only
        key, value = (c[None, slot, :, : position + 1] for c in (keys, values))  # [1, KVH, L, D]
        expected = attention_reference(query[:, :, token : token + 1], key, value, None, 0.3)
        torch.testing.assert_close(got[:, token], expected[:, 0])


def test_a_model_with_it_computes_and_generates_as_with_sdpa(generator):
    model, ids, mask = tiny_llama_batch(generator)
    logits = model(input_ids=ids, attention_mask=mask).logits
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert accelerate_attention(model) is model and model.config._attn_implementation == ATTENTION
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, labels=ids).loss, loss, rtol=0, atol=0)
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    for grad, param in zip(grads, model.parameters()):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)  # prefill and training: SDPA as before
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=0, atol=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), greedy)
