"""A decoder layer's ops (RMSNorm with the residual add before it, rotary embedding, a decode step's
attention over the slot cache) against their float64 references, on ragged shapes and strided views;
what the kernels do not take goes to the references, gradients included; and a Llama whose layers run
them computes and generates what it did before."""
import pytest
import torch
from conftest import assert_close_to_reference
from helpers import tiny_llama_batch

from switchcit.ops import attention, decoder
from switchcit.ops.attention import SlotBatch, slot_attention
from switchcit.ops.cpp import HAS_CPP_DECODER
from switchcit.ops.decoder import accelerate_decoder, add_rms_norm, apply_rotary_, rms_norm
from switchcit.ops.naive import attention_reference, rms_norm_reference, rotary_reference

pytestmark = pytest.mark.skipif(not HAS_CPP_DECODER, reason="switchcit._C is not built")
DTYPES = [torch.float32, torch.bfloat16]


def count_calls(monkeypatch, module, name: str) -> list:
    """Calls of the kernel wrapper ``module.name`` from now on (one entry each): the test saw the kernel run."""
    calls, kernel = [], getattr(module, name)

    def counted(*args):
        calls.append(name)
        return kernel(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 576), (7, 37), (33, 16)])
def test_rms_norm_and_its_residual_add_equal_the_reference(rows, hidden, dtype, generator, monkeypatch):
    calls = count_calls(monkeypatch, decoder, "cpp_rms_norm_")
    x, residual = (torch.randn(rows, hidden, generator=generator, dtype=torch.float64) * 3 for _ in range(2))
    weight = torch.randn(hidden, generator=generator, dtype=torch.float64)
    x, residual, weight = (t.to(dtype) for t in (x, residual, weight))
    with torch.no_grad():
        assert_close_to_reference(rms_norm(x, weight, 1e-5), rms_norm_reference(x.double(), weight.double(), 1e-5),
                                  dtype)
        normed, summed = add_rms_norm(x, residual, weight, 1e-6)
    assert len(calls) == 2
    assert torch.equal(summed, residual + x)  # the add rounds as torch's does
    assert_close_to_reference(normed, rms_norm_reference(summed.double(), weight.double(), 1e-6), dtype)
    if dtype == torch.bfloat16:  # transformers rounds after the norm and after the weight, and so does the kernel
        torch.testing.assert_close(normed, rms_norm_reference(summed, weight, 1e-6), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_equals_the_reference_on_views_of_one_projection(dtype, generator, monkeypatch):
    calls = count_calls(monkeypatch, decoder, "cpp_rotary_")
    tokens, q_heads, k_heads, dim = 5, 6, 2, 16
    # q and k as views of one [T, (Hq + 2 Hk) · D] projection: heads D apart, tokens further apart
    qkv = torch.randn(1, tokens, (q_heads + 2 * k_heads) * dim, generator=generator, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, tokens, dim, generator=generator, dtype=torch.float64)
    expected = rotary_reference(qkv[..., : q_heads * dim].view(1, tokens, q_heads, dim),
                                qkv[..., q_heads * dim : (q_heads + k_heads) * dim].view(1, tokens, k_heads, dim),
                                cos, sin)
    qkv, cos, sin = qkv.to(dtype), cos.to(dtype), sin.to(dtype)
    untouched = qkv[..., (q_heads + k_heads) * dim :].clone()
    q = qkv[..., : q_heads * dim].view(1, tokens, q_heads, dim)
    k = qkv[..., q_heads * dim : (q_heads + k_heads) * dim].view(1, tokens, k_heads, dim)
    same_dtype = rotary_reference(q, k, cos, sin)
    with torch.no_grad():
        apply_rotary_(q, k, cos, sin)
    assert calls
    for got, reference, rounded in zip((q, k), expected, same_dtype):
        assert_close_to_reference(got, reference, dtype)
        if dtype == torch.bfloat16:  # each product and the sum rounded as transformers rounds them
            torch.testing.assert_close(got, rounded, rtol=0, atol=0)
    assert torch.equal(qkv[..., (q_heads + k_heads) * dim :], untouched)  # v is not touched


def test_what_the_kernels_do_not_take_goes_to_the_references_with_gradients(generator):
    x, residual = (torch.randn(2, 4, 24, generator=generator, requires_grad=True) for _ in range(2))
    weight = torch.randn(24, generator=generator, requires_grad=True)
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)  # grad mode: the reference
    (normed.sum() + summed.pow(2).sum()).backward()
    grads = [t.grad.clone() for t in (x, residual, weight)]
    for t in (x, residual, weight):
        t.grad = None
    reference_sum = residual + x
    (rms_norm_reference(reference_sum, weight, 1e-5).sum() + reference_sum.pow(2).sum()).backward()
    for t, grad in zip((x, residual, weight), grads):
        torch.testing.assert_close(grad, t.grad, rtol=0, atol=0)
    # heads not D apart (a transposed layout): the reference, in place all the same
    q = torch.randn(1, 3, 5, 8, generator=generator).transpose(1, 2)  # [1, T=5, H=3, D=8], heads strided
    k = torch.randn(1, 5, 1, 8, generator=generator)
    cos, sin = torch.randn(2, 1, 5, 8, generator=generator)
    expected = rotary_reference(q, k, cos, sin)
    with torch.no_grad():
        apply_rotary_(q, k, cos, sin)
    torch.testing.assert_close(q, expected[0])
    torch.testing.assert_close(k, expected[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decode_positions, prompt_positions", [([4, 0, 37, 11], [(0, 6)]), ([63, 1], [])])
@pytest.mark.parametrize("heads, kv_heads, dim", [
    (9, 3, 64),  # SmolLM2: a group of 3 in registers
    (8, 2, 128),  # groups of 4: chunks of 3 and 1
    (4, 2, 16),  # a head size the register path does not take
])
def test_decode_attention_kernel_lets_each_token_see_its_own_slot_up_to_its_position(
        decode_positions, prompt_positions, heads, kv_heads, dim, dtype, generator, monkeypatch):
    calls = count_calls(monkeypatch, attention, "cpp_decode_attention")
    slots, capacity = 6, 64
    keys, values = torch.randn(2, slots, kv_heads, capacity, dim, generator=generator, dtype=torch.float64) * 2
    tokens = len(decode_positions) + sum(end - start for start, end in prompt_positions)
    query = torch.randn(1, heads, tokens, dim, generator=generator, dtype=torch.float64) * 4 / dim ** 0.5
    prompt_slot = len(decode_positions) + 1
    batch = SlotBatch.build(decode_positions, prompt_positions, prompt_slot, dtype, torch.device("cpu"))
    # the cache is [slots, KVH, P, D] contiguous, the query [1, H, T, D] a transposed view, as in the engine
    cast_query = query.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    with torch.no_grad():
        got = slot_attention(cast_query, keys.to(dtype), values.to(dtype), batch, dim ** -0.5)
    assert calls
    token_slots = [*range(len(decode_positions)), *(prompt_slot + row for row, (start, end)
                                                   in enumerate(prompt_positions) for _ in range(start, end))]
    positions = batch.positions.tolist()
    for token, (slot, position) in enumerate(zip(token_slots, positions)):
        key, value = (c[None, slot, :, : position + 1] for c in (keys, values))
        expected = attention_reference(query[:, :, token : token + 1], key, value, None, dim ** -0.5)
        assert_close_to_reference(got[:, token], expected[:, 0], dtype)


def test_a_llama_with_these_layers_computes_and_generates_as_before(generator, monkeypatch):
    model, ids, mask = tiny_llama_batch(generator)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, top_p=None, top_k=None)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert accelerate_decoder(accelerate_decoder(model)) is model
    assert all("forward" in layer.__dict__ for layer in model.model.layers)
    calls = count_calls(monkeypatch, decoder, "cpp_rotary_")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, top_p=None,
                                          top_k=None), greedy)
    assert len(calls) == 2 * (1 + 1 + 7)  # each layer's rotary in every forward: the prefills, 7 decode steps
    model(input_ids=ids, labels=ids).loss.backward()  # grad mode: transformers' own forward, bit for bit
    for grad, param in zip(grads, model.parameters()):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)


def test_transformers_output_capture_sees_the_fused_layers(generator, monkeypatch):
    model, ids, mask = tiny_llama_batch(generator)
    model.set_attn_implementation("eager")  # the attention interface that returns its weights
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    accelerate_decoder(model)
    calls = count_calls(monkeypatch, decoder, "cpp_rotary_")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(calls) == 2  # the fused layers ran, and the hooks on their attention recorded it
    for name in ("attentions", "hidden_states"):
        assert len(getattr(got, name)) == len(getattr(expected, name)) > 0
        for tensor, reference in zip(getattr(got, name), getattr(expected, name)):
            torch.testing.assert_close(tensor, reference, rtol=1e-5, atol=1e-5)


def test_decode_attention_kernel_never_reads_past_the_cache(generator, monkeypatch):
    calls = count_calls(monkeypatch, attention, "cpp_decode_attention")
    keys, values = torch.randn(2, 3, 2, 8, 16, generator=generator)  # 3 slots of 8 positions
    batch = SlotBatch.build([2, 10], [], 2, torch.float32, torch.device("cpu"))  # position 10 is past them
    query = torch.randn(1, 4, 2, 16, generator=generator)
    with torch.no_grad(), pytest.raises(RuntimeError):
        slot_attention(query, keys, values, batch, 0.25)  # SDPA's own error
    assert not calls
