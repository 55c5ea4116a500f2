"""The switch: task routing from a retained sample, persistence, adding a task, the switch op on both
backends, and the pipeline's routed forward, with the real SmolLM2 encoder on small prompt sets."""
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from switchcit.ops.naive import pool_features  # noqa: E402
from switchcit.prompts import chat_text, template_head  # noqa: E402
from switchcit.switch import Switch  # noqa: E402

TASKS = {
    "haiku": ["Write a haiku about {}.", "Compose a haiku on the topic of {}.", "Give me a haiku that mentions {}."],
    "simplify": ["Simplify this sentence: {} is remarkably complicated.",
                 "Rewrite in plain words: the {} was ameliorated.",
                 "Make this easier to read: notwithstanding the {}, it proceeded."],
    "factcheck": ["Is this claim true? {} cures the flu. Answer Yes or No.",
                  "Claim: {} prevents infection. True or false?",
                  "Fact check, Yes or No: {} was approved last year."],
}
TOPICS = ["rain", "autumn", "the sea", "a garden", "coffee", "winter", "mountains", "a vaccine"]


def prompts_of(task, topics):
    return [template.format(topic) for topic in topics for template in TASKS[task]]


@pytest.fixture(scope="module")
def encoder():
    from switchcit.pretrained import smollm2_135m_instruct

    try:
        folder = smollm2_135m_instruct()
    except ImportError as err:
        pytest.skip(str(err))
    return str(folder)


def test_pool_features_last_and_mean():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])  # left and right padding
    torch.testing.assert_close(pool_features(hidden, mask, "last"), torch.stack([hidden[0, 3], hidden[1, 1]]))
    torch.testing.assert_close(pool_features(hidden, mask, "mean"),
                               torch.stack([hidden[0, 1:].mean(0), hidden[1, :2].mean(0)]))


@pytest.mark.parametrize("layer", [0, 3])
def test_switch_routes_saves_and_adds_a_task(encoder, tmp_path, layer):
    tasks = ["haiku", "simplify"]
    prompts = [p for task in tasks for p in prompts_of(task, TOPICS[:4])]
    labels = [task for task in tasks for _ in range(12)]
    # 12 template prompts per task are too few to calibrate the unknown-task gate (tests below): open it
    switch = Switch.train(prompts, labels, encoder=encoder, layer=layer, gate_margin=math.inf)
    held_out = [p for task in tasks for p in prompts_of(task, TOPICS[4:6])]
    expected = [task for task in tasks for _ in range(6)]
    assert switch.route(held_out) == expected

    loaded = Switch.load(switch.save(tmp_path / "switch"))
    assert loaded.tasks == tasks and loaded.retained == switch.retained and loaded.layer == layer
    assert loaded.route(held_out) == expected

    assert switch.add_task("factcheck", prompts_of("factcheck", TOPICS[:4])) is switch, "chainable"
    assert switch.tasks == ["haiku", "simplify", "factcheck"], "add_task changes the switch it is called on"
    assert switch.route(prompts_of("factcheck", TOPICS[6:])) == ["factcheck"] * 6
    assert switch.route(held_out) == expected, "old tasks keep routing right from their retained sample"
    assert switch.layer == layer and switch.gate_margin == math.inf, "the new task keeps the switch's settings"


def test_training_runs_to_convergence(generator):
    """Low-variance features need many epochs: the stopping rule keeps going until the loss is small
    (the old fixed 20 epochs left such a switch at 76 % on its own training prompts)."""
    train, labels = clustered_features(generator, 4, 30, 32)
    faint = train * 1e-3 + torch.randn(train.shape, generator=generator) * 4e-3  # mostly noise
    switch = Switch.fit(faint, faint, labels, gate_margin=math.inf)
    truth = torch.tensor([switch.tasks.index(t) for t in labels])
    assert (switch.classify(faint, faint) == truth).float().mean() == 1.0
    assert switch.epochs_trained > 20
    easy = Switch.fit(train, train, labels)
    assert easy.epochs_trained < switch.epochs_trained, "well-separated tasks stop early"


def test_bench_switch_accuracy_measures_what_switch_train_and_route_ship(encoder):
    """The benchmark's path (features once per layer, Switch.fit, Switch.classify) gives what users get
    from Switch.train + Switch.route."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_switch_accuracy as bench

    from switchcit.switch import encode_layers, load_encoder

    tasks = ["haiku", "simplify", "factcheck"]
    train = {t: prompts_of(t, TOPICS[:3]) for t in tasks}
    test = [p for t in tasks for p in prompts_of(t, TOPICS[5:7])] + ["Tell me a joke.", "hello there"]
    model, tokenizer = load_encoder(encoder)
    layer = 2
    shipped = Switch.train([p for t in tasks for p in train[t]], [t for t in tasks for _ in train[t]], encoder=model,
                           tokenizer=tokenizer, layer=layer, seed=3)
    pooled = encode_layers([p for t in tasks for p in train[t]], model, tokenizer, [0, layer])
    per_task = {k: dict(zip(tasks, rows.split(len(train["haiku"])))) for k, rows in pooled.items()}
    bench.TASKS = tuple(tasks)
    switch = bench.fit_switch(per_task, layer, {t: len(train[t]) for t in tasks}, seed=3)
    pooled = encode_layers(test, model, tokenizer, [0, layer])
    assert bench.route(switch, pooled[layer], pooled[0]) == shipped.route(test)


def test_switch_rejects_bad_input(encoder, tmp_path):
    with pytest.raises(ValueError, match="as many task labels as prompts"):
        Switch.train(["a", "b"], ["x"], encoder=encoder)
    with pytest.raises(ValueError, match=r"switch layer 30 is outside \[0, 30\)"):
        Switch.train(["a"], ["x"], encoder=encoder, layer=30)
    switch = Switch.train(["a poem", "a fact"], ["x", "y"], encoder=encoder)
    folder = switch.save(tmp_path / "switch")
    config = json.loads((folder / "switch.json").read_text())
    config["base_model"]["hidden_size"] = 1024
    (folder / "switch.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trained on another base model"):
        Switch.load(folder, encoder=encoder)


def peft_adapters(encoder, tmp_path, tasks, layers=None):
    """Random (non-zero) PEFT LoRA adapters for ``tasks`` on q/v of ``layers`` (default all), saved."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(encoder)
    peft_model = None
    for task in tasks:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 layers_to_transform=layers)
        peft_model = peft.get_peft_model(base, config, adapter_name=task) if peft_model is None else peft_model
        if task not in peft_model.peft_config:
            peft_model.add_adapter(task, config)
    peft_model.save_pretrained(tmp_path / "adapters")
    return peft_model.eval(), {t: tmp_path / "adapters" / t for t in tasks}


@pytest.mark.parametrize("layer", [0, 4])
def test_pipeline_routes_inside_the_forward_and_generates_what_peft_generates(encoder, tmp_path, layer):
    """Prompts of two tasks, routed by the switch at layer K inside the one routed forward (adapters on
    layers ≥ K), generate exactly what PEFT generates with those adapters named explicitly; the
    routing costs no extra pass; ids stay on the device."""
    from switchcit.pipeline import SwitchModel

    tasks = ("haiku", "simplify")
    peft_model, folders = peft_adapters(encoder, tmp_path, tasks, layers=list(range(layer, 30)))
    model = SwitchModel.from_pretrained(encoder, folders)
    prompts = [p for task in tasks for p in prompts_of(task, TOPICS[:4])]
    labels = [task for task in tasks for _ in range(12)]
    model.switch = Switch.train(prompts, labels, encoder=model.model, tokenizer=model.tokenizer, layer=layer,
                                gate_margin=math.inf)
    assert model.one_pass

    calls = []
    model.model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape),
                                          with_kwargs=True)
    batch = prompts_of("simplify", TOPICS[6:7])[:2] + prompts_of("haiku", TOPICS[7:8])[:2]
    texts, adapters = model.generate(batch, max_new_tokens=6)
    assert adapters == ["simplify", "simplify", "haiku", "haiku"]
    head = (model.context.num_adapters + 1, len(template_head(model.tokenizer)))  # the shared prefix, once
    assert calls[0] == head and len(calls[1:]) == 6, "one routed prefill + 5 decode steps, no separate switch pass"
    texts_base, adapters_base = model.generate(batch, [None] * 4, max_new_tokens=6)
    assert adapters_base == [None] * 4 and texts != texts_base, "adapters change the answers"

    tokenizer = model.tokenizer
    inputs = tokenizer([chat_text(tokenizer, p) for p in batch], return_tensors="pt", padding=True,
                       padding_side="left", add_special_tokens=False)
    expected = peft_model.generate(**inputs, adapter_names=adapters, max_new_tokens=6, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id)
    expected_texts = tokenizer.batch_decode(expected[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == [t.strip() for t in expected_texts]


def test_pipeline_with_adapters_below_the_switch_layer_routes_with_an_early_exit_pass(encoder, tmp_path):
    """Adapters on every layer, switch at layer 3: the pipeline routes with a pass that stops at layer 3,
    then runs the routed forward — same adapters as the switch alone picks."""
    from switchcit.pipeline import SwitchModel

    tasks = ("haiku", "simplify")
    _, folders = peft_adapters(encoder, tmp_path, tasks)
    model = SwitchModel.from_pretrained(encoder, folders)
    prompts = [p for task in tasks for p in prompts_of(task, TOPICS[:4])]
    labels = [task for task in tasks for _ in range(12)]
    model.switch = Switch.train(prompts, labels, encoder=model.model, tokenizer=model.tokenizer, layer=3,
                                gate_margin=math.inf)
    assert not model.one_pass
    batch = prompts_of("haiku", TOPICS[6:7]) + prompts_of("simplify", TOPICS[7:8])
    _, adapters = model.generate(batch, max_new_tokens=2)
    assert adapters == ["haiku"] * 3 + ["simplify"] * 3 == model.route(batch)


def test_pipeline_rejects_a_run_whose_adapters_do_not_match_its_switch_layer(encoder, tmp_path):
    from switchcit.pipeline import SwitchModel

    _, folders = peft_adapters(encoder, tmp_path, ("haiku",), layers=[1, 2])
    with pytest.raises(ValueError, match=r"weights in layers \[1\], below the run's switch layer 2"):
        SwitchModel.from_pretrained(encoder, folders, switch_layer=2)


def clustered_features(gen, tasks, per_task, dim, shift=0.0):
    """Features of ``tasks`` well-separated clusters (cluster centres fixed by ``tasks``' seed)."""
    centres = torch.randn(tasks, dim, generator=torch.Generator().manual_seed(tasks)) * 4
    rows = torch.cat([centres[t] + torch.randn(per_task, dim, generator=gen) for t in range(tasks)])
    return rows + shift, [f"task{t}" for t in range(tasks) for _ in range(per_task)]


def test_gate_routes_known_tasks_and_sends_unknown_ones_to_base(generator):
    train, labels = clustered_features(generator, 3, 40, 24)
    gate_train, _ = clustered_features(generator, 3, 40, 24)
    switch = Switch.fit(train, gate_train, labels)
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
    switch = Switch.fit(train, train, labels)
    assert switch.max_distance == math.inf
    assert switch.classify(train, train).tolist() == [0, 1, 2]


def test_switch_route_fused_kernel_matches_torch(generator):
    """The switch op on both backends (Triton in the interpreter on CPU) from a trained switch's head,
    ragged padding, a task with no adapter in the bank."""
    from conftest import DEVICE

    from switchcit.ops import switch_route

    train, labels = clustered_features(generator, 3, 30, 32)
    switch = Switch.fit(train, train + 0.1, labels)
    batch, seq_len = 9, 6
    prompts = clustered_features(generator, 3, 3, 32)[0]
    hidden = prompts[:, None, :].expand(batch, seq_len, 32) + torch.randn(batch, seq_len, 32, generator=generator) * 0.1
    embeddings = (prompts + 0.1)[:, None, :].expand(batch, seq_len, 32).clone()  # mean embeddings look like the tasks
    embeddings[::3] += 30  # three unknown-task prompts for the gate
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    mask[1, :2] = 0
    mask[2, 4:] = 0
    task_to_adapter = torch.tensor([2, -1, 0])
    head = switch.head()
    expected = switch_route(hidden, embeddings, mask, head, task_to_adapter, backend="torch")
    assert set(expected[0].tolist()) == {-1, 0, 2}
    got = switch_route(hidden.to(DEVICE), embeddings.to(DEVICE), mask.to(DEVICE), head, task_to_adapter,
                       backend="triton")
    assert torch.equal(got[0].cpu(), expected[0]) and torch.equal(got[1].cpu(), expected[1])
    with pytest.raises(ValueError, match="one id per task"):
        switch_route(hidden, embeddings, mask, head, task_to_adapter[:2])
    with pytest.raises(ValueError, match="must be"):
        switch_route(hidden, embeddings[:, :3], mask, head, task_to_adapter)
    with pytest.raises(ValueError, match="runs on backend 'torch' or 'triton'"):
        switch_route(hidden, embeddings, mask, head, task_to_adapter, backend="cpp")


CIT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cit"


@pytest.mark.skipif(not CIT_DATA.is_dir(), reason="needs ../shared/data/cit")
def test_switch_on_the_real_tasks_routes_right_and_sends_an_unseen_task_to_base(encoder):
    """The user contract on real data: the default switch (layer-0 features of SmolLM2) trained on
    1 % of each task's train split routes held-out test prompts to their task, and sends prompts of a
    task it never saw (every chatterbot-corpus utterance) to the base model ≥ 90 % of the time."""
    from switchcit.cit.data import chatterbot_dialogues, load_task, retained_sample

    tasks = ["simplification", "explanation", "haiku", "covidfact"]
    retained = {t: retained_sample([e.prompt for e in load_task(CIT_DATA / t, "train")], 0.01) for t in tasks}
    switch = Switch.train([p for t in tasks for p in retained[t]], [t for t in tasks for _ in retained[t]],
                          encoder=encoder)
    test = {t: retained_sample([e.prompt for e in load_task(CIT_DATA / t, "test")], 1.0, seed=1)[:40] for t in tasks}
    routed = switch.route([p for t in tasks for p in test[t]])
    right = sum(r == t for r, t in zip(routed, [t for t in tasks for _ in test[t]]))
    assert right >= 0.99 * len(routed), f"{right}/{len(routed)} routed to their task"

    unseen = sorted({a for pairs in chatterbot_dialogues().values() for a, _ in pairs})
    to_base = switch.route(unseen).count(None)
    assert to_base >= 0.9 * len(unseen), f"{to_base}/{len(unseen)} unseen-task prompts to the base model"


def test_switch_op_and_plan_never_read_values_on_the_host(generator):
    """Between the switch and the adapters nothing reads a tensor's values on the host (which would sync
    a GPU and break CUDA-graph capture): the switch op and the context's plan run on meta tensors, which
    have no values to read."""
    from switchcit import RoutingContext
    from switchcit.ops import switch_route

    train, labels = clustered_features(generator, 3, 20, 32)
    head = Switch.fit(train, train, labels).head("meta")
    task_to_adapter = torch.tensor([2, 0, -1], dtype=torch.int32, device="meta")
    hidden = torch.empty(6, 5, 32, device="meta")
    mask = torch.empty(6, 5, dtype=torch.long, device="meta")
    sequence_ids, token_ids = switch_route(hidden, hidden, mask, head, task_to_adapter, "mean", backend="torch")
    context = RoutingContext(["a", "b", "c"])
    context.route_tokens(token_ids, sequence_ids)
    plan = context.plan
    assert plan.num_tokens == 30 and plan.sorted_token_ids.shape == (30,) and plan.adapter_offsets.shape == (5,)
    context.begin_forward((6, 1), torch.device("meta"))  # a decode step's plan from the routed sequences
    assert context.plan.num_tokens == 6
