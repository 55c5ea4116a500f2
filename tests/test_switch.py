"""The switch (work in progress for issue 6): task routing from a retained sample, persistence and
adding a task, with the real SmolLM2 encoder on small prompt sets."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchcit.switch import Switch, pool_features  # noqa: E402

TASKS = {
    "haiku": ["Write a haiku about {}.", "Compose a haiku on the topic of {}.", "Give me a haiku that mentions {}."],
    "simplify": ["Simplify this sentence: {} is remarkably complicated.", "Rewrite in plain words: the {} was ameliorated.",
                 "Make this easier to read: notwithstanding the {}, it proceeded."],
    "factcheck": ["Is this claim true? {} cures the flu. Answer Yes or No.", "Claim: {} prevents infection. True or false?",
                  "Fact check, Yes or No: {} was approved last year."],
}
TOPICS = ["rain", "autumn", "the sea", "a garden", "coffee", "winter", "mountains", "a vaccine"]


def prompts_of(task, topics):
    return [template.format(topic) for topic in topics for template in TASKS[task]]


@pytest.fixture(scope="module")
def encoder():
    from switchcit.models import smollm2_135m_instruct

    try:
        folder = smollm2_135m_instruct()
    except ImportError as err:
        pytest.skip(str(err))
    return str(folder)


def test_pool_features_last_and_mean():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left and right padding
    torch.testing.assert_close(pool_features(hidden, mask, "last"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    torch.testing.assert_close(pool_features(hidden, mask, "mean"), torch.stack([hidden[0, 1:].mean(0), hidden[1, :2].mean(0)]))


def test_switch_routes_saves_and_adds_a_task(encoder, tmp_path):
    tasks = ["haiku", "simplify"]
    prompts = [p for task in tasks for p in prompts_of(task, TOPICS[:4])]
    labels = [task for task in tasks for _ in range(12)]
    switch = Switch.train(prompts, labels, encoder=encoder, epochs=30)
    held_out = [p for task in tasks for p in prompts_of(task, TOPICS[4:6])]
    expected = [task for task in tasks for _ in range(6)]
    assert switch.route(held_out) == expected

    loaded = Switch.load(switch.save(tmp_path / "switch"))
    assert loaded.tasks == tasks and loaded.retained == switch.retained
    assert loaded.route(held_out) == expected

    grown = switch.add_task("factcheck", prompts_of("factcheck", TOPICS[:4]), epochs=30)
    assert grown.tasks == ["haiku", "simplify", "factcheck"]
    assert grown.route(prompts_of("factcheck", TOPICS[6:])) == ["factcheck"] * 6
    assert grown.route(held_out) == expected, "old tasks keep routing right from their retained sample"


def test_switch_rejects_bad_input(encoder):
    with pytest.raises(ValueError, match="as many task labels as prompts"):
        Switch.train(["a", "b"], ["x"], encoder=encoder)
    with pytest.raises(ValueError, match="unknown feature"):
        Switch.train(["a"], ["x"], encoder=encoder, feature="cls")


def test_switch_model_routes_and_generates_a_mixed_batch(encoder, tmp_path):
    """Prompts of two tasks and an unknown one, routed by the switch (encoder: the base model itself),
    generate exactly what PEFT generates with those adapters named explicitly."""
    peft = pytest.importorskip("peft")
    from switchcit.switch import SwitchModel

    base = transformers.AutoModelForCausalLM.from_pretrained(encoder)
    peft_model = None
    for task in ("haiku", "simplify"):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft_model = peft.get_peft_model(base, config, adapter_name=task) if peft_model is None else peft_model
        if task not in peft_model.peft_config:
            peft_model.add_adapter(task, config)
    peft_model.save_pretrained(tmp_path / "adapters")

    model = SwitchModel.from_pretrained(encoder, {t: tmp_path / "adapters" / t for t in ("haiku", "simplify")})
    prompts = [p for task in ("haiku", "simplify") for p in prompts_of(task, TOPICS[:4])]
    labels = [task for task in ("haiku", "simplify") for _ in range(12)]
    model.switch = Switch.train(prompts, labels, encoder=model.model, tokenizer=model.tokenizer, epochs=30)

    batch = prompts_of("simplify", TOPICS[6:7])[:2] + prompts_of("haiku", TOPICS[7:8])[:2]
    texts, tasks = model.generate(batch, max_new_tokens=6)
    assert tasks == ["simplify", "simplify", "haiku", "haiku"]
    texts_base, _ = model.generate(batch, tasks=[None] * 4, max_new_tokens=6)
    assert texts != texts_base, "adapters change the answers"

    tokenizer = model.tokenizer
    chats = [model._chat(p) for p in batch]
    inputs = tokenizer(chats, return_tensors="pt", padding=True)
    expected = peft_model.eval().generate(**inputs, adapter_names=tasks, max_new_tokens=6, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
    assert texts == tokenizer.batch_decode(expected[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
