"""``switchcit serve`` over loopback TCP on a tiny run: the OpenAI schema, continuous batching that answers
exactly what each request gets alone (and lets a short request overtake a long one), streaming equal to
the plain answer, sampling options, 4xx JSON for bad input, failures isolated, adapters and tasks added
and removed under traffic, metrics, an API key, clients that leave, 429 on a full queue and a graceful
shutdown."""
import argparse
import asyncio
import itertools
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")

from serve_fixtures import TASKS, TOPICS, TRAINED_TOPICS, serving, task_prompts, tiny_run  # noqa: E402

from switchcit.pipeline import SwitchModel  # noqa: E402
from switchcit.serving.app import TextStream, create_app  # noqa: E402

MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run_dir):
    """One server for the module: ``(base_url, app)``."""
    app = create_app(SwitchModel.from_run(run_dir), max_num_seqs=8, max_model_len=MAX_MODEL_LEN, max_queue=64)
    with serving(app) as (url, _):
        yield url, app


def body(endpoint: str, prompt: str, model: str = "auto", max_tokens: int = 4, **options) -> dict:
    if endpoint == "/v1/completions":
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **options}
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, **options}


def answer(response: dict) -> tuple:
    """What must not depend on batching: text, finish reason, adapter, token counts."""
    choice = response["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return text, choice["finish_reason"], choice["adapter"], response["usage"]


def stream(url: str, endpoint: str, payload: dict) -> list[dict]:
    """The chunks of a streamed answer (``[DONE]`` checked and dropped)."""
    with httpx.stream("POST", f"{url}{endpoint}", json=payload | {"stream": True}, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_openai_schema_models_health_and_adapters_change_answers(server):
    url, _ = server
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["auto", "base", *TASKS]
    assert health(url) == {"status": "ok", "waiting": 0, "running": 0}

    prompt = task_prompts("haiku", TRAINED_TOPICS[:1])[0]
    texts = {}
    for model in ["base", *TASKS]:
        response = httpx.post(f"{url}/v1/completions", json=body("/v1/completions", prompt, model, 8), timeout=30)
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["object"] == "text_completion" and data["model"] == model and data["id"].startswith("cmpl-")
        (choice,) = data["choices"]
        assert choice["index"] == 0 and choice["adapter"] == model and choice["finish_reason"] in ("stop", "length")
        assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
        texts[model] = choice["text"]
    assert len(set(texts.values())) == len(texts), f"every adapter must change the answer: {texts}"

    chat = httpx.post(f"{url}/v1/chat/completions", json=body("/v1/chat/completions", prompt), timeout=30).json()
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"][0]["message"]["role"] == "assistant"
    assert chat["choices"][0]["adapter"] == "haiku", "auto routes a trained haiku prompt to the haiku adapter"
    assert chat["usage"]["prompt_tokens"] > 20, "the chat template (system prompt, roles) wraps the message"


def unique_requests() -> list[tuple[str, dict]]:
    """Auto and explicit requests over both endpoints, prompts of every task (trained and held-out
    topics) and prompts of no task, with different max_tokens."""
    gen = random.Random(0)
    prompts = [p for task in TASKS for p in task_prompts(task, [TOPICS[0], TOPICS[3], TOPICS[8]])]
    prompts += ["Tell me a joke.", "What is the capital of France?", "hello"]
    requests = []
    for i, prompt in enumerate(prompts):
        for model in ("auto", gen.choice(["base", *TASKS])):
            endpoint = "/v1/completions" if (i + len(model)) % 3 else "/v1/chat/completions"
            requests.append((endpoint, body(endpoint, prompt, model, gen.randint(1, 12))))
    return requests


async def send_all(url: str, requests: list[tuple[str, dict]], clients: int) -> list[tuple[int, dict]]:
    """``clients`` concurrent clients (one connection each) work through ``requests`` in order."""
    results: list = [None] * len(requests)
    todo = iter(enumerate(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async def client_loop():
            for i, (endpoint, payload) in todo:
                response = await client.post(endpoint, json=payload)
                results[i] = response.status_code, response.json()

        await asyncio.gather(*(client_loop() for _ in range(clients)))
    return results


def test_mixed_requests_from_24_clients_equal_each_request_served_alone(server):
    url, app = server
    uniques = unique_requests()
    alone = [answer(r) for _, r in asyncio.run(send_all(url, uniques, clients=1))]
    auto_adapters = {a[2] for (_, payload), a in zip(uniques, alone) if payload["model"] == "auto"}
    assert {"base", *TASKS} <= auto_adapters, f"the switch routes to every adapter and to base: {auto_adapters}"

    running_sizes = []
    step = app.state.engine.engine.step

    def recording_step():
        running_sizes.append(len(app.state.engine.engine.running))
        step()

    app.state.engine.engine.step = recording_step
    try:
        picks = random.Random(1).choices(range(len(uniques)), k=300)
        results = asyncio.run(send_all(url, [uniques[i] for i in picks], clients=24))
    finally:
        del app.state.engine.engine.step
    assert [status for status, _ in results] == [200] * len(picks), "no request dropped or refused"
    mismatches = [(uniques[i], answer(r), alone[i]) for i, (_, r) in zip(picks, results) if answer(r) != alone[i]]
    assert not mismatches, f"{len(mismatches)} answers differ from the request served alone, e.g. {mismatches[0]}"
    assert max(running_sizes) == 8, "sequences of many requests ran together, up to max_num_seqs"


def test_a_short_request_finishes_before_a_long_one_that_started_earlier(server):
    url, _ = server
    long_body = body("/v1/completions", "Tell me everything about the sea.", "base", 200, stop=None)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        long = pool.submit(lambda: (httpx.post(f"{url}/v1/completions", json=long_body, timeout=60), time.monotonic()))
        wait_for(lambda: health(url)["running"] == 1)
        short = httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "hi", "haiku", 2), timeout=60)
        short_done = time.monotonic()
        long_response, long_done = long.result()
    assert short.status_code == 200 and long_response.status_code == 200
    assert long_response.json()["usage"]["completion_tokens"] == 200, "the long answer ran to its limit"
    assert short_done < long_done, f"the short request waited for the long one ({short_done - started:.2f} s)"


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_text_equals_the_plain_answer_with_usage_last(server, endpoint):
    url, _ = server
    for model, prompt in [("auto", task_prompts("haiku", TOPICS[:1])[0]), ("simplify", "hello there")]:
        payload = body(endpoint, prompt, model, 12, n=2, seed=5)
        plain = httpx.post(f"{url}{endpoint}", json=payload, timeout=60).json()
        chunks = stream(url, endpoint, payload | {"stream_options": {"include_usage": True}})
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
        for index, choice in enumerate(plain["choices"]):
            parts = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
            text = "".join(p["text"] if "text" in p else p["delta"].get("content", "") for p in parts)
            expected = choice["text"] if "text" in choice else choice["message"]["content"]
            assert text == expected, (model, index)
            assert [p["finish_reason"] for p in parts][-1] == choice["finish_reason"]
            assert {p["adapter"] for p in parts} == {choice["adapter"]}
            if "delta" in parts[0]:
                assert parts[0]["delta"]["role"] == "assistant"
        assert all(c["object"] == ("chat.completion.chunk" if "chat" in endpoint else "text_completion")
                   for c in chunks)


def test_sampling_options(server):
    url, _ = server
    prompt = task_prompts("simplify", TOPICS[:1])[0]

    def text(**options):
        payload = {"model": "base", "prompt": prompt, "max_tokens": 10, **options}
        response = httpx.post(f"{url}/v1/completions", json=payload, timeout=60)
        assert response.status_code == 200, response.text
        return [c["text"] for c in response.json()["choices"]]

    greedy = text(temperature=0)
    assert text(temperature=1.5, top_k=1) == greedy, "top_k = 1 is greedy"
    assert text(temperature=1.5, seed=7) == text(temperature=1.5, seed=7), "the same seed, the same text"
    samples = {text(temperature=1.5, seed=seed)[0] for seed in range(6)}
    assert len(samples) > 1, "different seeds draw different texts"
    assert len(text(temperature=1.5, seed=1, n=3)) == 3
    many = httpx.post(f"{url}/v1/completions", json={"model": "haiku", "prompt": ["a", "bb"], "n": 2, "max_tokens": 3,
                                                     "temperature": 0}, timeout=60).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == many["choices"][1]["text"], "greedy choices of one prompt agree"
    # a stop string taken from the free-running answer: the text ends right before it
    free = greedy[0]
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop and stop in free
    (cut,) = text(temperature=0, stop=[stop, "\u2603never"])
    assert cut == free[: free.index(stop)]
    chunks = stream(url, "/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                                             "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_a_possible_stop_string_and_never_splits_a_character(run_dir):
    tokenizer = SwitchModel.from_run(run_dir).tokenizer
    ids = tokenizer("naïve café ☃ snow END here")["input_ids"]
    stream_text = TextStream(tokenizer, ["END"], [])
    deltas = [stream_text.add([token]) for token in ids] + [stream_text.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "naïve café ☃ snow " and stream_text.stopped
    free = TextStream(tokenizer, [], [])
    assert "".join([free.add([t]) for t in ids] + [free.finish()]) == tokenizer.decode(ids)


BAD_REQUESTS = [
    # (endpoint, raw body or JSON, status, param)
    ("/v1/completions", '{"prompt": "hi", "max_tokens": ', 400, None),  # malformed JSON
    ("/v1/completions", "[1, 2]", 400, None),  # not an object
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),  # missing field
    ("/v1/chat/completions", {"model": "auto"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "be brief"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["a", "b"]}]}, 400, "messages.0.content"),
    ("/v1/completions", {"prompt": "hi", "model": "poetry"}, 404, "model"),  # unknown adapter
    ("/v1/completions", {"prompt": "hi", "model": 3}, 400, "model"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * (2 * MAX_MODEL_LEN)}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),  # unsupported: named, not ignored
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/embeddings", {"input": "hi"}, 404, None),
    ("/v1/completions", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),  # deeper than the parser goes
    ("/v1/completions", '{"prompt": "hi", "user": ' + "[" * 100 + "]" * 100 + "}", 400, None),  # an unused field
    ("/v1/completions", '{"prompt": "a \\ud800 b"}', 400, None),  # a lone surrogate: no text
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, None),
    ("/v1/completions", '{"prompt": "hi", "user": "\\ud800"}', 400, None),
    ("/v1/completions", '{"prompt": "hi", "temperature": NaN}', 400, None),  # Python's JSON, not JSON
    ("/v1/completions", '{"prompt": "hi", "temperature": 1e999}', 400, None),
    ("/v1/completions", {"prompt": "hi", "model": "x" * 100_000}, 404, "model"),  # errors quote a short prefix
    ("/v1/chat/completions", {"messages": [{"role": "r" * 100_000, "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/completions", '{"prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", 400, None),  # beyond int()'s digits
    ("/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such/folder"}, 400, "lora_path"),
    ("/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "/tmp"}, 400, "lora_name"),
    ("/v1/unload_lora_adapter", {"lora_name": "poetry"}, 404, "lora_name"),
    ("/v1/tasks", {"name": "haiku", "lora_path": "/tmp", "prompts": ["a"]}, 400, "name"),
    ("/v1/tasks", {"name": "new", "lora_path": "/tmp", "prompts": []}, 400, "prompts"),
]


def test_bad_input_gets_a_4xx_json_error_before_any_model_work(server):
    url, app = server
    engine = app.state.engine.engine
    steps, step = [], engine.step
    engine.step = lambda: (steps.append(1), step())
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for endpoint, payload, status, param in BAD_REQUESTS:
                content = payload if isinstance(payload, str) else json.dumps(payload)
                response = client.post(endpoint, content=content, headers={"content-type": "application/json"})
                assert response.status_code == status, (endpoint, payload, response.text)
                error = response.json()["error"]
                assert error["message"] and error["type"], error
                assert error["param"] == param, (payload, error)
                assert len(response.content) < 1000, "an error quotes at most a short prefix of what it rejects"
            assert client.get("/v1/completions").status_code == 405
            assert not steps, "no bad request reached the model"
            good = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "presence_penalty": 0})
            assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 2
    finally:
        del engine.step


def test_an_empty_last_user_message_routed_by_auto_is_answered_alone_and_together(server):
    url, _ = server
    empty = [{"role": "user", "content": ""}]
    empty_after_turns = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "ok"}, *empty]
    for messages in (empty, empty_after_turns):
        alone = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
        assert alone.status_code == 200, alone.text
    batch = [("/v1/chat/completions", {"model": "auto", "messages": empty, "max_tokens": 2})]
    batch += [("/v1/completions", body("/v1/completions", p, "haiku")) for p in task_prompts("haiku", TOPICS[:5])]
    assert [status for status, _ in asyncio.run(send_all(url, batch, clients=len(batch)))] == [200] * len(batch)


class EngineGate:
    """Blocks the engine thread between two steps until released: requests pile up deterministically."""

    def __init__(self, app):
        self.engine, self.release = app.state.engine.engine, threading.Event()
        self.engine.call(lambda: self.release.wait(60))


def test_a_request_that_fails_at_run_time_fails_alone(run_dir):
    """A step that raises runs again in parts, each prompt alone: only the faulty request gets an error
    (500, OpenAI's shape); the others that joined with it are answered."""
    model = SwitchModel.from_run(run_dir)
    poison = model.tokenizer("poison")["input_ids"]  # a completion's prompt is tokenised as it is
    forward, batch_sizes = model.routed_forward, []

    def failing_for_poison(input_ids, *args, **kwargs):
        prompts = kwargs["slot_batch"].prompts  # a step: input_ids [1, T] holds its prompts' tokens
        if prompts is not None:
            batch_sizes.append(prompts.num_rows)
        tokens = input_ids[0].tolist()
        if any(tokens[i : i + len(poison)] == poison for i in range(len(tokens))):
            raise RuntimeError("injected failure")
        return forward(input_ids, *args, **kwargs)

    model.routed_forward = failing_for_poison
    requests = [("/v1/completions", body("/v1/completions", prompt, model_name)) for prompt, model_name in
                [("poison", "base"), ("hello", "auto"), ("Write a haiku about rain.", "haiku"), ("hi", "base")]]
    app = create_app(model, max_model_len=64)
    with serving(app) as (url, _):
        gate = EngineGate(app)
        with ThreadPoolExecutor(len(requests)) as pool:
            futures = [pool.submit(httpx.post, f"{url}{e}", json=p, timeout=60) for e, p in requests]
            wait_for(lambda: health(url)["waiting"] == len(requests))
            gate.release.set()
            results = [f.result() for f in futures]
        assert health(url)["status"] == "ok"
    assert [r.status_code for r in results] == [500, 200, 200, 200], [r.text for r in results]
    error = results[0].json()["error"]
    assert error["type"] == "server_error" and "injected failure" in error["message"]
    assert batch_sizes == [4, 1, 1, 1, 1], "one step with the four prompts, then each prompt alone"


def test_a_body_over_the_limit_gets_413_before_it_is_read(run_dir):
    app = create_app(SwitchModel.from_run(run_dir), max_model_len=64, max_body_bytes=10_000)
    with serving(app) as (url, _):
        big = json.dumps({"prompt": "word " * 400_000})  # 2 MB
        for content in (big, (big[i:i + 65536].encode() for i in range(0, len(big), 65536))):  # sized, then chunked
            response = httpx.post(f"{url}/v1/completions", content=content, timeout=30,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_tokenising_runs_off_the_event_loop(run_dir, monkeypatch):
    """While one request is being templated and tokenised, /health and other requests are answered."""
    from switchcit.serving import app as serving_module

    entered, release = threading.Event(), threading.Event()
    template = serving_module.chat_messages_text

    def slow_template(tokenizer, messages):
        if messages[-1]["content"] == "slow":
            entered.set()
            release.wait(timeout=60)
        return template(tokenizer, messages)

    monkeypatch.setattr(serving_module, "chat_messages_text", slow_template)
    app = create_app(SwitchModel.from_run(run_dir), max_model_len=64)
    with serving(app) as (url, _), ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, f"{url}/v1/chat/completions", timeout=60,
                           json=body("/v1/chat/completions", "slow", "base"))
        try:
            assert entered.wait(30)
            assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            fast = httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "hi", "base"), timeout=10)
            assert fast.status_code == 200
        finally:
            release.set()
        assert slow.result(timeout=60).status_code == 200


def test_full_queue_gets_429_and_queued_requests_are_still_served(run_dir):
    app = create_app(SwitchModel.from_run(run_dir), max_model_len=64, max_queue=2)
    with serving(app) as (url, _), ThreadPoolExecutor(4) as pool:
        def post(prompt):
            return httpx.post(f"{url}/v1/completions", json=body("/v1/completions", prompt, "base"), timeout=60)

        gate = EngineGate(app)
        queued = [pool.submit(post, p) for p in ("first", "second")]
        wait_for(lambda: health(url)["waiting"] == 2)
        refused = post("third")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        gate.release.set()
        assert [f.result().status_code for f in queued] == [200, 200]
        assert post("fourth").status_code == 200, "the server keeps serving"


def test_a_client_that_leaves_mid_stream_frees_its_slot(server):
    url, app = server
    engine = app.state.engine.engine
    step = engine.step
    engine.step = lambda: (time.sleep(0.02), step())  # 200 tokens now take seconds
    tokens_before = generated_tokens(url)
    try:
        payload = body("/v1/completions", "Tell me everything about the sea.", "base", 200, stream=True)
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=60) as response:
            next(response.iter_lines())
            (leaving,) = engine.running
        wait_for(lambda: health(url)["running"] == 0, timeout=10)
    finally:
        del engine.step
    assert leaving.aborted and len(leaving.output) < 200, "generation stopped when the client left"
    assert generated_tokens(url) - tokens_before < 200
    assert httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "hi"), timeout=30).status_code == 200


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def generated_tokens(url: str) -> float:
    return scrape(url)["switchcit:generation_tokens_total"]


def test_metrics_count_tokens_requests_per_adapter_and_latencies(server):
    url, _ = server
    before = scrape(url)
    response = httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "hi", "factcheck", 5), timeout=30)
    tokens = response.json()["usage"]["completion_tokens"]
    after = scrape(url)
    key = 'switchcit:request_success_total{adapter="factcheck",finished_reason="%s"}'
    reason = response.json()["choices"][0]["finish_reason"]
    assert after[key % reason] - before.get(key % reason, 0) == 1
    grew = lambda name: after[f"switchcit:{name}"] - before[f"switchcit:{name}"]  # noqa: E731
    assert grew("generation_tokens_total") == tokens
    assert grew("time_to_first_token_seconds_count") == 1 and grew("inter_token_latency_seconds_count") == tokens - 1
    assert after["switchcit:num_requests_waiting"] == 0 and "switchcit:num_requests_running" in after


def test_an_api_key_guards_the_v1_endpoints(run_dir):
    app = create_app(SwitchModel.from_run(run_dir), max_model_len=64, api_key="sesame")
    with serving(app) as (url, _):
        payload = body("/v1/completions", "hi", "base", 2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            refused = httpx.post(f"{url}/v1/completions", json=payload, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        granted = httpx.post(f"{url}/v1/completions", json=payload, headers={"Authorization": "Bearer sesame"},
                             timeout=30)
        assert granted.status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/metrics").status_code == 200


@pytest.mark.parametrize("drain_timeout_s, expected", [(30.0, 200), (0.2, 503)])
def test_shutdown_lets_running_requests_finish_or_aborts_them_after_the_drain_timeout(run_dir, drain_timeout_s,
                                                                                       expected):
    app = create_app(SwitchModel.from_run(run_dir), max_model_len=64, drain_timeout_s=drain_timeout_s)
    with serving(app) as (url, server), ThreadPoolExecutor(2) as pool:
        gate = EngineGate(app)
        futures = [pool.submit(httpx.post, f"{url}/v1/completions", timeout=60,
                               json=body("/v1/completions", prompt, "haiku", 8)) for prompt in ("a", "b")]
        wait_for(lambda: health(url)["waiting"] == 2)
        server.should_exit = True
        wait_for(lambda: not app.state.engine.accepting)
        if expected == 503:
            time.sleep(0.5)  # past the drain timeout, while the engine is still held
        gate.release.set()
        responses = [f.result(timeout=30) for f in futures]
        assert [r.status_code for r in responses] == [expected] * 2, [r.text for r in responses]
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "late"), timeout=5)


def test_serve_command_listens_on_loopback_by_default():
    from switchcit import cli
    from switchcit.serving import app as serving_module

    assert "switchcit.serving.app" in cli.COMMAND_MODULES
    parser = argparse.ArgumentParser()
    serving_module.add_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "some/run"])
    assert (args.run_dir, args.host, args.port, args.dtype) == ("some/run", "127.0.0.1", 8000, "float32")


def test_adapters_and_tasks_come_and_go_under_traffic(run_dir):
    """While clients keep sending requests: an adapter is loaded (it answers as the same weights do
    under their first name), unloaded (then 404), and a new task is added (the switch routes its
    held-out prompts to it) — no request fails and none waits long."""
    app = create_app(SwitchModel.from_run(run_dir), max_num_seqs=4, max_model_len=128)
    adapters = run_dir / "switchcit" / "adapters"
    translate = lambda topics: [f"Translate into French: I like {t} very much." for t in topics]  # noqa: E731
    with serving(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
        stop, results = threading.Event(), []

        def traffic():
            with httpx.Client(base_url=url, timeout=60) as own:
                for i in itertools.count():
                    if stop.is_set():
                        return
                    started = time.monotonic()
                    payload = body("/v1/completions", task_prompts(TASKS[i % 3], TOPICS[:2])[i % 6],
                                   ["auto", "base", *TASKS][i % 5], 6)
                    results.append((own.post("/v1/completions", json=payload).status_code, time.monotonic() - started))

        with ThreadPoolExecutor(3) as pool:
            clients = [pool.submit(traffic) for _ in range(3)]
            try:
                wait_for(lambda: len(results) >= 6)
                loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "haiku2",
                                                                    "lora_path": str(adapters / "haiku")})
                assert loaded.status_code == 200, loaded.text
                assert "haiku2" in [m["id"] for m in client.get("/v1/models").json()["data"]]
                prompt = task_prompts("haiku", TOPICS[:1])[0]
                same = [answer(client.post("/v1/completions", json=body("/v1/completions", prompt, name, 8)).json())[0]
                        for name in ("haiku", "haiku2")]
                assert same[0] == same[1], "the loaded adapter answers as the same weights do"
                assert client.post("/v1/load_lora_adapter", json={"lora_name": "haiku2", "lora_path": str(
                    adapters / "haiku")}).status_code == 400, "already loaded"

                assert client.post("/v1/unload_lora_adapter", json={"lora_name": "haiku2"}).status_code == 200
                gone = client.post("/v1/completions", json=body("/v1/completions", prompt, "haiku2"))
                assert gone.status_code == 404 and "haiku2" not in client.get("/v1/models").text

                added = client.post("/v1/tasks", json={"name": "translate", "lora_path": str(adapters / "simplify"),
                                                       "prompts": translate(TRAINED_TOPICS)})
                assert added.status_code == 200, added.text
                assert added.json()["tasks"] == [*TASKS, "translate"]
                routed = [answer(client.post("/v1/completions", json=body("/v1/completions", p)).json())[2]
                          for p in translate(TOPICS[6:])]
                assert routed.count("translate") >= 3, f"auto routes the new task's held-out prompts to it: {routed}"
                seen = len(results)
                wait_for(lambda: len(results) >= seen + 6)
            finally:
                stop.set()
            for future in clients:
                future.result()
    assert [status for status, _ in results] == [200] * len(results), "no request in flight failed"
    assert max(seconds for _, seconds in results) < 20, "no request stalled"


def test_serve_refuses_a_missing_run_and_impossible_limits_in_one_line(run_dir, capsys):
    from switchcit import cli

    for argv in (["serve", str(run_dir / "nowhere")], ["serve", str(run_dir), "--max-model-len", "100000"],
                 ["serve", str(run_dir), "--max-num-seqs", "4", "--kv-cache-memory-bytes", "1000"],
                 ["serve", str(run_dir), "--threads", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        stderr = capsys.readouterr().err
        error = stderr.strip().splitlines()[-1]  # after transformers' loading progress
        assert error.startswith("switchcit serve: ") and "Traceback" not in stderr, stderr


def test_serves_in_bfloat16(run_dir):
    import torch

    model = SwitchModel.from_run(run_dir, device="cpu", dtype=torch.bfloat16)
    assert next(model.network.parameters()).dtype == torch.bfloat16
    app = create_app(model, max_model_len=64)
    assert app.state.engine.engine.cache.keys[0].dtype == torch.bfloat16
    with serving(app) as (url, _):
        response = httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "hi", "auto", 4), timeout=30)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_sigterm_drains_a_stream_in_flight_then_exits(run_dir):
    """``switchcit serve`` as users run it: SIGTERM while a stream is generating; the stream still ends
    normally, then the process shuts down."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "switchcit.cli", "serve", str(run_dir), "--port", str(port),
                               "--max-model-len", "2048", "--max-num-seqs", "2"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is None and _answers(f"{url}/health"), timeout=120)
        payload = body("/v1/completions", "Tell me everything about the sea.", "base", 1500, stream=True)
        with httpx.stream("POST", f"{url}/v1/completions", json=payload, timeout=120) as response:
            lines = response.iter_lines()
            first = next(lines)
            server.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2][len("data: "):])
        assert "error" not in last and last["choices"][0]["finish_reason"] in ("stop", "length"), last
        # uvicorn re-raises the signal once its shutdown is done: the exit status says SIGTERM, cleanly
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "Finished server process" in server.stderr.read().decode()
    finally:
        if server.poll() is None:
            server.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_the_openai_client_streams_and_completes(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY")
    messages = [{"role": "user", "content": task_prompts("haiku", TOPICS[:1])[0]}]
    whole = client.chat.completions.create(model="auto", messages=messages, max_tokens=8, temperature=0)
    parts = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model="auto", messages=messages, max_tokens=8, temperature=0, stream=True) if chunk.choices]
    assert "".join(parts) == whole.choices[0].message.content and whole.usage.completion_tokens >= 1
    completion = client.completions.create(model="haiku", prompt=["a", "b"], max_tokens=3, temperature=0)
    assert [c.index for c in completion.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="haiku", prompt="a", max_tokens=3, logprobs=2)
