"""The switch: task routing from a retained sample, persistence and
adding a task, with the real SmolLM2 encoder on small prompt sets."""
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchcit.switch import Switch, chat_text, pool_features  # noqa: E402

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
    # 12 template prompts per task are too few to calibrate the unknown-task gate (tests below): open it
    switch = Switch.train(prompts, labels, encoder=encoder, epochs=30, gate_margin=math.inf)
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
    model.switch = Switch.train(prompts, labels, encoder=model.model, tokenizer=model.tokenizer, epochs=30,
                                gate_margin=math.inf)

    batch = prompts_of("simplify", TOPICS[6:7])[:2] + prompts_of("haiku", TOPICS[7:8])[:2]
    texts, tasks = model.generate(batch, max_new_tokens=6)
    assert tasks == ["simplify", "simplify", "haiku", "haiku"]
    texts_base, _ = model.generate(batch, tasks=[None] * 4, max_new_tokens=6)
    assert texts != texts_base, "adapters change the answers"

    tokenizer = model.tokenizer
    chats = [chat_text(tokenizer, p) for p in batch]
    inputs = tokenizer(chats, return_tensors="pt", padding=True, padding_side="left")
    expected = peft_model.eval().generate(**inputs, adapter_names=tasks, max_new_tokens=6, do_sample=False,
                                          pad_token_id=tokenizer.pad_token_id)
    assert texts == tokenizer.batch_decode(expected[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def clustered_features(gen, tasks, per_task, dim, shift=0.0):
    """Features of ``tasks`` well-separated clusters (cluster centres fixed by ``tasks``' seed)."""
    centres = torch.randn(tasks, dim, generator=torch.Generator().manual_seed(tasks)) * 4
    rows = torch.cat([centres[t] + torch.randn(per_task, dim, generator=gen) for t in range(tasks)])
    return rows + shift, [f"task{t}" for t in range(tasks) for _ in range(per_task)]


def test_gate_routes_known_tasks_and_sends_unknown_ones_to_base(generator):
    train, labels = clustered_features(generator, 3, 40, 24)
    gate_train, _ = clustered_features(generator, 3, 40, 24)
    switch = Switch.fit(train, gate_train, labels, epochs=30)
    assert math.isfinite(switch.max_distance)

    test, test_labels = clustered_features(generator, 3, 50, 24)
    gate_test, _ = clustered_features(generator, 3, 50, 24)
    routed = switch.classify(test, gate_test)
    truth = torch.tensor([switch.tasks.index(t) for t in test_labels])
    assert (routed == truth).float().mean() >= 0.97

    unseen = torch.randn(60, 24, generator=generator) * 4 + 12  # far from every task's prompts
    assert (switch.classify(test[:60], unseen) == -1).all(), "the gate reads its own features"
    switch.max_distance = math.inf
    assert (switch.classify(test[:60], unseen) >= 0).all(), "without the gate every prompt gets a task"


def test_gate_stays_open_with_one_prompt_per_task(generator):
    train, labels = clustered_features(generator, 3, 1, 16)
    switch = Switch.fit(train, train, labels, epochs=50)
    assert switch.max_distance == math.inf
    assert switch.classify(train, train).tolist() == [0, 1, 2]


def test_route_hidden_fused_kernel_matches_torch(generator):
    """The same routing through ``Switch.route_hidden`` on both backends (the Triton one in the
    interpreter on CPU), ragged right padding, a task with no adapter in the bank."""
    from conftest import DEVICE

    train, labels = clustered_features(generator, 3, 30, 32)
    switch = Switch.fit(train, train + 0.1, labels, feature="last_token", epochs=20)
    batch, seq_len = 9, 6
    prompts = clustered_features(generator, 3, 3, 32)[0]
    hidden = torch.randn(batch, seq_len, 32, generator=generator)
    hidden[:, -1] = prompts  # last tokens look like the tasks
    embeddings = (prompts + 0.1)[:, None, :].expand(batch, seq_len, 32).clone()  # so do mean embeddings
    embeddings[::3] += 30  # three unknown-task prompts for the gate
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    task_to_adapter = torch.tensor([2, -1, 0])
    expected = switch.route_hidden(hidden, embeddings, mask, task_to_adapter, backend="torch")
    assert set(expected[0].tolist()) == {-1, 0, 2}
    got = switch.route_hidden(hidden.to(DEVICE), embeddings.to(DEVICE), mask.to(DEVICE), task_to_adapter, backend="triton")
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    with pytest.raises(ValueError, match="one id per task"):
        switch.route_hidden(hidden, embeddings, mask, task_to_adapter[:2])
    with pytest.raises(ValueError, match="must be"):
        switch.route_hidden(hidden, embeddings[:, :3], mask, task_to_adapter)


CIT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cit"


@pytest.mark.skipif(not CIT_DATA.is_dir(), reason="needs ../shared/data/cit")
def test_switch_on_the_real_tasks_routes_right_and_sends_an_unseen_task_to_base(encoder):
    """The user contract on real data: the default switch (last-token features of SmolLM2) trained on
    1 % of each task's train split routes held-out test prompts to their task, and sends prompts of a
    task it never saw (every chatterbot-corpus utterance) to the base model ≥ 90 % of the time."""
    from switchcit.data import chatterbot_dialogues, load_task, retained_sample

    tasks = ["simplification", "explanation", "haiku", "covidfact"]
    retained = {t: retained_sample([e.prompt for e in load_task(CIT_DATA / t, "train")], 0.01) for t in tasks}
    switch = Switch.train([p for t in tasks for p in retained[t]], [t for t in tasks for _ in retained[t]], encoder=encoder)
    test = {t: retained_sample([e.prompt for e in load_task(CIT_DATA / t, "test")], 1.0, seed=1)[:40] for t in tasks}
    routed = switch.route([p for t in tasks for p in test[t]])
    right = sum(r == t for r, t in zip(routed, [t for t in tasks for _ in test[t]]))
    assert right >= 0.99 * len(routed), f"{right}/{len(routed)} routed to their task"

    unseen = sorted({a for pairs in chatterbot_dialogues().values() for a, _ in pairs})
    to_base = switch.route(unseen).count(None)
    assert to_base >= 0.9 * len(unseen), f"{to_base}/{len(unseen)} unseen-task prompts to the base model"
