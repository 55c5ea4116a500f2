"""Hugging Face / PEFT integration on tiny random models: accelerated PEFT layers give PEFT's own
outputs (logits, greedy generate), restore undoes it, and adapter banks round-trip PEFT folders."""
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from switchcit import accelerate, load_adapters, restore, routing_context, save_adapter, set_adapters  # noqa: E402
from switchcit.modules import MultiLoraLinear  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, rank, alpha, targets): ranks and targets differ, so layers hold different adapter subsets.
ADAPTERS = [("simplify", 8, 16, LLAMA_TARGETS), ("explain", 4, 4, ["q_proj", "v_proj"]), ("haiku", 2, 8, LLAMA_TARGETS)]


def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2():
    config = transformers.GPT2Config(vocab_size=128, n_embd=48, n_layer=2, n_head=4, n_positions=64, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def with_adapters(base, adapters, **extra):
    """A PeftModel with random (non-zero) LoRA weights for each adapter."""
    model = None
    for name, rank, alpha, targets in adapters:
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    return model.eval()


def batch(gen, size=5, length=7):
    input_ids = torch.randint(1, 128, (size, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    attention_mask[3, -2:] = 0  # right padding
    return input_ids, attention_mask


NAMES = ["simplify", "explain", "__base__", "haiku", "simplify"]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mixed_batch_logits_equal_peft(backend, generator, monkeypatch):
    monkeypatch.setenv("SWITCHCIT_BACKEND", backend)
    model = with_adapters(tiny_llama(), ADAPTERS)
    input_ids, mask = batch(generator)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
        plain_expected = model(input_ids=input_ids, attention_mask=mask).logits  # active adapter only
        accelerate(model)
        assert model.switchcit_accelerated_layers == 14
        got = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
        plain = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, plain_expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[2]), "adapters must change the logits"


def test_greedy_generate_identical_tokens(generator):
    model = with_adapters(tiny_llama(), ADAPTERS)
    input_ids, mask = batch(generator)
    mask[3] = 1  # generate wants left padding only
    kwargs = dict(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=6, do_sample=False)
    expected = model.generate(**kwargs)
    accelerate(model)
    got = model.generate(**kwargs)
    assert torch.equal(got, expected)


def test_accelerate_is_idempotent_and_restore_gives_peft_back(generator):
    model = with_adapters(tiny_llama(), ADAPTERS)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    peft_forward = type(layer).forward
    input_ids, mask = batch(generator)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
    assert accelerate(accelerate(model)) is model
    assert model.switchcit_accelerated_layers == 14
    assert isinstance(layer, peft.tuners.lora.LoraLayer) and "forward" in layer.__dict__
    restore(model)
    assert "forward" not in layer.__dict__ and type(layer).forward is peft_forward
    assert not hasattr(model, "switchcit_context")
    assert all(not k.startswith("_switchcit") for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits,
                                   expected)


def test_adapter_added_after_accelerate(generator):
    model = accelerate(with_adapters(tiny_llama(), ADAPTERS[:2]))
    model.add_adapter("haiku", peft.LoraConfig(r=2, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                               init_lora_weights=False))
    # No second accelerate(): the new adapter joins the bank on the next forward.
    input_ids, mask = batch(generator)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
        restore(model)
        expected = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unservable_layers_stay_on_peft_with_one_warning(generator):
    model = with_adapters(tiny_llama(), ADAPTERS[:1])
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    input_ids, mask = batch(generator)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask).logits
    with pytest.warns(UserWarning, match="DoRA") as record:
        accelerate(model)
    assert len(record) == 1 and "q_proj" in str(record[0].message)
    assert model.switchcit_accelerated_layers == 12
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask).logits, expected,
                                   rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_layers(generator):
    adapters = [("task1", 4, 8, ["c_attn", "c_proj", "c_fc"]), ("task2", 8, 8, ["c_attn"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that Conv1D needs fan_in_fan_out
        model = with_adapters(tiny_gpt2(), adapters, fan_in_fan_out=True)
    input_ids, mask = batch(generator)
    names = ["task1", "task2", "__base__", "task2", "task1"]
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits
        got = accelerate(model)(input_ids=input_ids, attention_mask=mask, adapter_names=names).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_adapter_bank_loads_peft_folders_and_exports_them(tmp_path, generator):
    peft_model = with_adapters(tiny_llama(), ADAPTERS)
    peft_model.save_pretrained(tmp_path / "peft")  # one folder per adapter
    folders = {name: tmp_path / "peft" / name for name, *_ in ADAPTERS}  # PEFT: one subfolder per adapter
    input_ids, mask = batch(generator)
    with torch.no_grad():
        expected = peft_model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits

    model = load_adapters(tiny_llama(), folders)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MultiLoraLinear)
    assert routing_context(model).names == [name for name, *_ in ADAPTERS]
    set_adapters(model, [None if n == "__base__" else n for n in NAMES])
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # Export each adapter; PEFT loads it to the same outputs as the bank routed to that adapter.
    for name, *_ in ADAPTERS:
        save_adapter(model, name, tmp_path / "export" / name)
        reloaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "export" / name).eval()
        set_adapters(model, [name] * 5)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask).logits,
                                       reloaded(input_ids=input_ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_bank_generate_routes_per_sequence(tmp_path, generator):
    peft_model = with_adapters(tiny_llama(), ADAPTERS)
    input_ids, mask = batch(generator)
    mask[3] = 1
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    expected = peft_model.generate(**kwargs, adapter_names=NAMES)
    peft_model.save_pretrained(tmp_path)
    model = load_adapters(tiny_llama(), {name: tmp_path / name for name, *_ in ADAPTERS})
    set_adapters(model, [None if n == "__base__" else n for n in NAMES])
    assert torch.equal(model.generate(**kwargs), expected)


def test_load_adapters_rejects_bad_folders(tmp_path):
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        load_adapters(model, {"x": tmp_path})
    other = with_adapters(tiny_gpt2(), [("gpt", 4, 8, ["c_attn"])], fan_in_fan_out=True)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="targets modules this model lacks"):
        load_adapters(model, {"gpt": tmp_path / "gpt"})
    assert not any(isinstance(m, MultiLoraLinear) for m in model.modules()), "nothing changed on failure"


@pytest.fixture(scope="module")
def smollm2_folder():
    from switchcit.pretrained import smollm2_135m_instruct

    try:
        return smollm2_135m_instruct()
    except ImportError as err:
        pytest.skip(str(err))


def test_real_smollm2_mixed_batch_and_generate(smollm2_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder).eval()
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    model = with_adapters(base, [("simplify", 8, 16, targets), ("explain", 4, 8, targets),
                                 ("haiku", 16, 16, ["q_proj"])])
    prompts = ["Simplify: The committee deliberated at length.", "Explain why the sky is blue.",
               "Write a haiku about rain.", "Is water wet? Answer Yes or No."]
    names = ["simplify", "explain", "haiku", "__base__"]
    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs, adapter_names=names).logits
        expected_tokens = model.generate(**inputs, adapter_names=names, max_new_tokens=8, do_sample=False)
        accelerate(model)
        got = model(**inputs, adapter_names=names).logits
        got_tokens = model.generate(**inputs, adapter_names=names, max_new_tokens=8, do_sample=False)
    # fp32 sums in another order over 30 layers: bound the error by the logits' scale.
    assert (got - expected).abs().max() <= 2e-5 * expected.abs().max()
    assert torch.equal(got_tokens, expected_tokens)


def test_plain_forward_after_an_adapter_is_added(generator):
    """A new adapter that no routing names yet still grows every bank; plans follow the new size."""
    model = accelerate(with_adapters(tiny_llama(), ADAPTERS[:2]))
    input_ids, mask = batch(generator)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=mask)  # plans cached for two adapters
        model.add_adapter("haiku", peft.LoraConfig(r=2, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                   init_lora_weights=False))
        got = model(input_ids=input_ids, attention_mask=mask).logits  # active adapter: simplify
        restore(model)
        expected = model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_accelerate_linear_under_accelerated_peft_layers(generator, monkeypatch):
    """PEFT's base layers (and lm_head) through the C++ kernel in a no-grad decode-sized forward: PEFT's
    logits within rounding and its greedy tokens; under grad mode the same logits and gradients, bitwise."""
    from switchcit.modules import accelerate_linear, restore_linear
    from switchcit.ops.cpp import HAS_CPP_LINEAR

    if not HAS_CPP_LINEAR:
        pytest.skip("C++ core not built")
    import switchcit.ops.dense as dense

    model = accelerate(with_adapters(tiny_llama(), ADAPTERS))
    layer_of = lambda m: m.base_model.model.model.layers[0].self_attn.q_proj
    input_ids, mask = batch(generator, length=3)  # 15 rows: every linear layer within the kernel's range
    mask[3] = 1
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
    generate = dict(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES, max_new_tokens=4, do_sample=False)
    expected_tokens = model.generate(**generate)
    model.train()  # PEFT takes no adapter_names in training: the active adapter
    trained = model(input_ids=input_ids, attention_mask=mask).logits
    trained.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.eval()

    calls, kernel = [], dense.cpp_linear
    monkeypatch.setattr(dense, "cpp_linear", lambda *args: calls.append(args[1].shape) or kernel(*args))
    accelerate_linear(model)
    with torch.no_grad():
        got = model(input_ids=input_ids, attention_mask=mask, adapter_names=NAMES).logits
    assert len(calls) == 2 * 7 + 1, "q k v o gate up down of both layers, and lm_head"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(**generate), expected_tokens)

    calls.clear()
    model.train()
    again = model(input_ids=input_ids, attention_mask=mask).logits
    again.square().mean().backward()
    assert calls == [] and torch.equal(again, trained)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if p.grad is not None)
    restore_linear(model)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.switchcit_accelerated_layers == 14 and "forward" in layer_of(model).__dict__, "PEFT layers stay"
