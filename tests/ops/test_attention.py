"""Decode-step attention (one query token per sequence, grouped-query heads sharing one read of their
keys) against softmax attention with the keys repeated, in float64, on the engine's strided slot
views with ragged lengths; and a transformers model that uses it generates what it did before."""
import pytest
import torch

from switchcit.ops.attention import ATTENTION, accelerate_attention, decode_attention
from switchcit.ops.naive import attention_reference


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_equals_the_reference_on_strided_slots_with_ragged_lengths(heads, kv_heads, generator):
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
    torch.testing.assert_close(decode_attention(query, key, value, mask, dim ** -0.5), expected)
    torch.testing.assert_close(decode_attention(query, key, value, None, 0.3),
                               attention_reference(query, key, value, None, 0.3))
    # A row attends to its own length only: what lies beyond it in the slot does not matter.
    cache[:, 0, 1:] = 1e3
    torch.testing.assert_close(decode_attention(query, key, value, mask, dim ** -0.5)[0], expected[0])


def test_a_model_with_it_computes_and_generates_as_with_sdpa(generator):
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :1] = 0  # left padding
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
