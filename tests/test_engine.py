"""The engine (continuous batching over a slot KV cache) against independent references: Hugging Face
``generate`` with its own cache for each request alone, and the sampling rules against their
definitions."""
import random

import pytest
import torch

pytest.importorskip("peft")

from serve_fixtures import TASKS, TOPICS, task_prompts, tiny_run  # noqa: E402

from switchcit.engine import FINISH_ABORT, Engine, EngineRequest, SamplingParams, sample_token  # noqa: E402
from switchcit.pipeline import SwitchModel  # noqa: E402
from switchcit.prompts import prompt_tokens, template_head  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return SwitchModel.from_run(tiny_run(tmp_path_factory))


def hf_greedy(model: SwitchModel, prompt: list[int], adapter: str | None, limit: int, stops: list[int]) -> list[int]:
    """Transformers' own generate (its DynamicCache, no engine) for one prompt with one adapter."""
    from switchcit.adapters import set_adapters

    set_adapters(model.model, [adapter])
    try:
        out = model.network.generate(torch.tensor([prompt]), max_new_tokens=limit, do_sample=False,
                                     eos_token_id=stops, pad_token_id=model.tokenizer.pad_token_id)
    finally:
        set_adapters(model.model, None)
    return out[0, len(prompt):].tolist()


def test_few_slots_ragged_prompts_and_limits_equal_each_request_generated_alone(model):
    """More requests than slots, ragged prompts, limits from 1 to 20, adapters mixed: requests join and
    leave at every step (slots move), and each answer is what transformers generates for it alone."""
    gen = random.Random(0)
    prompts = [p for task in TASKS for p in task_prompts(task, TOPICS[:3])] + ["hi", "Tell me a long story."]
    names = [gen.choice([None, *TASKS]) for _ in prompts]
    stops = model.stop_token_ids()
    requests, used = [], {}
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        ids, span = prompt_tokens(model.tokenizer, prompt)
        params = SamplingParams(max_tokens=gen.randint(1, 20))
        adapter = -1 if name is None else model.context.id_of(name)
        requests.append(EngineRequest(ids, params, lambda t, f, a, i=i: used.__setitem__(i, a), adapter, span=span))
    engine = Engine(model, max_num_seqs=3, max_model_len=128, max_num_batched_tokens=40)
    moves, move = [], engine.cache.move
    engine.cache.move = lambda *args: (moves.append(args), move(*args))
    for request in requests:
        engine.add(request)
    engine.run_until_done()
    assert moves, "finished sequences freed slots that others moved into"
    for i, (request, name) in enumerate(zip(requests, names)):
        expected = hf_greedy(model, request.prompt_ids, name, request.params.max_tokens, stops)
        assert request.output == expected, (i, name)
        assert used[i] == request.adapter


def test_a_shared_prefix_is_prefilled_once_per_adapter_and_changes_no_answer(model):
    """With the chat template's head as the engine's prefix, prefills compute only what follows it
    (its keys and values are copied per adapter, the switch's adapter for routed prompts), and every
    answer and adapter is what the engine gives without it; a model change through ``call`` (here:
    one adapter's weights) makes it prefill the prefix again."""
    prompts = [p for task in TASKS for p in task_prompts(task, TOPICS[:2])]
    head = template_head(model.tokenizer)
    assert len(head) > 4

    def run(prefix_ids, change=None):
        widths, forward = [], model.network.forward

        def recording(*args, **kwargs):
            widths.append(kwargs["input_ids"].shape)
            return forward(*args, **kwargs)

        model.network.forward = recording
        try:
            engine = Engine(model, max_num_seqs=3, max_model_len=128, prefix_ids=prefix_ids)
            if change is not None:  # after a first round of requests, which computed the prefix
                ids, span = prompt_tokens(model.tokenizer, prompts[0])
                engine.add(EngineRequest(ids, SamplingParams(max_tokens=1), lambda *a: None, span=span))
                engine.run_until_done()
                engine.call(change)
            requests, adapters = [], {}
            for i, prompt in enumerate(prompts):
                ids, span = prompt_tokens(model.tokenizer, prompt)
                explicit = i % 3 == 0  # the others are routed by the switch inside the prefill
                adapter = model.context.id_of(TASKS[i % len(TASKS)]) if explicit else -1
                requests.append(EngineRequest(ids, SamplingParams(max_tokens=6),
                                              lambda t, f, a, i=i: adapters.__setitem__(i, a), adapter,
                                              routed=not explicit, span=span))
                engine.add(requests[-1])
            engine.run_until_done()
        finally:
            del model.network.forward
        return [(request.output, adapters[i]) for i, request in enumerate(requests)], widths

    plain, plain_widths = run(())
    shared, shared_widths = run(head)
    assert shared == plain
    entries = model.context.num_adapters + 1
    assert shared_widths.count((entries, len(head))) == 1, "the prefix once, for every adapter and the base model"
    steps = [shape[1] for shape in shared_widths if shape != (entries, len(head))]  # flattened steps [1, T]
    assert sum(steps) == sum(shape[1] for shape in plain_widths) - len(prompts) * len(head), "no prefix token computed"
    lora_b = next(p for n, p in model.model.named_parameters() if "lora_b" in n.lower())
    saved = lora_b.detach().clone()

    def scale_adapters():
        with torch.no_grad():
            lora_b.mul_(5)

    try:
        changed, _ = run(head, scale_adapters)
        with torch.no_grad():
            lora_b.copy_(saved * 5)
        expected, _ = run(())
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)
    assert changed == expected and changed != plain


def test_routed_requests_take_the_switch_s_adapter(model):
    prompts = [task_prompts(task, TOPICS[:1])[0] for task in TASKS]
    expected = model.route(prompts)
    got = {}
    engine = Engine(model, max_num_seqs=2, max_model_len=128)
    for i, prompt in enumerate(prompts):
        ids, span = prompt_tokens(model.tokenizer, prompt)
        engine.add(EngineRequest(ids, SamplingParams(max_tokens=2), lambda t, f, a, i=i: got.__setitem__(i, a),
                                 routed=True, span=span))
    engine.run_until_done()
    assert [model.context.names[got[i]] if got[i] >= 0 else None for i in range(len(prompts))] == expected


def test_an_aborted_request_leaves_at_the_next_step(model):
    finished = []
    engine = Engine(model, max_num_seqs=2, max_model_len=128)
    long = EngineRequest([1, 2, 3], SamplingParams(max_tokens=100), lambda t, f, a: f and finished.append(f))
    engine.add(long)
    engine.step()
    assert engine.running == [long]
    engine.abort(long)
    engine.step()
    assert engine.running == [] and finished == [FINISH_ABORT] and len(long.output) < 100
    with pytest.raises(ValueError, match="exceed"):
        engine.add(EngineRequest([1] * 120, SamplingParams(max_tokens=9), lambda *a: None))
    for adapter in (-2, model.context.num_adapters):  # refused before any step reads it
        with pytest.raises(ValueError, match="outside"):
            engine.add(EngineRequest([1, 2], SamplingParams(max_tokens=1), lambda *a: None, adapter))
    assert engine.waiting == []


def test_sampling_follows_temperature_top_k_and_top_p():
    torch.manual_seed(0)
    logits = torch.randn(50, dtype=torch.float64) * 2
    order = logits.argsort(descending=True)
    generator = torch.Generator().manual_seed(0)
    draw = lambda params, n=4000: torch.stack([sample_token(logits, params, generator) for _ in range(n)])  # noqa: E731

    assert set(draw(SamplingParams(1, temperature=1.0, top_k=1), 20).tolist()) == {int(order[0])}
    assert set(draw(SamplingParams(1, temperature=1.0, top_k=5), 2000).tolist()) <= set(order[:5].tolist())
    probabilities = (logits / 0.7).softmax(-1)
    keep = int((probabilities[order].cumsum(-1) < 0.8).sum()) + 1  # the smallest prefix holding 80 %
    assert set(draw(SamplingParams(1, temperature=0.7, top_p=0.8), 3000).tolist()) <= set(order[:keep].tolist())
    counts = torch.bincount(draw(SamplingParams(1, temperature=0.7)), minlength=50) / 4000
    assert torch.allclose(counts, probabilities.float(), atol=0.03), "draws follow softmax(logits / T)"
    with pytest.raises(ValueError):
        SamplingParams(0)
    with pytest.raises(ValueError):
        SamplingParams(4, top_p=0.0)
