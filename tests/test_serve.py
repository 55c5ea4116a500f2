"""``switchcit serve`` over loopback TCP on a tiny run: the OpenAI schema, mixed-adapter batching that
answers exactly what each request gets alone, 4xx JSON for bad input (413 for a body over the limit),
a request failing at run time failing alone, tokenising off the event loop, 429 on a full queue, and
a graceful shutdown that finishes or explicitly fails every open request."""
import argparse
import asyncio
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")

from serve_fixtures import TASKS, TOPICS, TRAINED_TOPICS, serving, task_prompts, tiny_run  # noqa: E402

from switchcit.pipeline import SwitchModel  # noqa: E402
from switchcit.serving.app import create_app  # noqa: E402

MAX_PROMPT_TOKENS, MAX_NEW_TOKENS = 256, 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


class BatchLog:
    """Wraps the server's batch function: records the adapters of every batch it runs."""

    def __init__(self, app):
        batcher = app.state.batcher
        self.run_batch, self.batches = batcher.run_batch, []
        batcher.run_batch = self

    def __call__(self, requests):
        generations = self.run_batch(requests)
        self.batches.append([g.adapter for g in generations])
        return generations


@pytest.fixture(scope="module")
def server(run_dir):
    """One server for the module: ``(base_url, batch log)``."""
    app = create_app(SwitchModel.from_run(run_dir), max_batch_size=32, batch_window_ms=10,
                     max_prompt_tokens=MAX_PROMPT_TOKENS, max_new_tokens=MAX_NEW_TOKENS, max_queue=64)
    log = BatchLog(app)
    with serving(app) as (url, _):
        yield url, log


def body(endpoint: str, prompt: str, model: str = "auto", max_tokens: int = 4) -> dict:
    if endpoint == "/v1/completions":
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


def answer(response: dict) -> tuple:
    """What must not depend on batching: text, finish reason, adapter, token counts."""
    choice = response["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    return text, choice["finish_reason"], choice["adapter"], response["usage"]


def test_openai_schema_models_health_and_adapters_change_answers(server):
    url, _ = server
    models = httpx.get(f"{url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["auto", "base", *TASKS]
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "queued": 0, "in_batch": 0}

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
            requests.append((endpoint, body(endpoint, prompt, model, gen.randint(1, 6))))
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


def test_1000_mixed_requests_from_32_clients_equal_each_request_served_alone(server):
    url, log = server
    uniques = unique_requests()
    log.batches.clear()
    alone = [answer(r) for _, r in asyncio.run(send_all(url, uniques, clients=1))]
    assert all(len(batch) == 1 for batch in log.batches), "one client at a time: every request alone"
    auto_adapters = {a[2] for (_, payload), a in zip(uniques, alone) if payload["model"] == "auto"}
    assert {"base", *TASKS} <= auto_adapters, f"the switch routes to every adapter and to base: {auto_adapters}"

    picks = random.Random(1).choices(range(len(uniques)), k=1000)
    log.batches.clear()
    results = asyncio.run(send_all(url, [uniques[i] for i in picks], clients=32))

    assert [status for status, _ in results] == [200] * 1000, "no request dropped or refused"
    mismatches = [(uniques[i], answer(r), alone[i]) for i, (_, r) in zip(picks, results) if answer(r) != alone[i]]
    assert not mismatches, f"{len(mismatches)} answers differ from the request served alone, e.g. {mismatches[0]}"
    assert sum(len(b) for b in log.batches) == 1000
    assert max(len(set(b)) for b in log.batches) >= 3, "batches mixed several adapters"
    assert len(log.batches) < 500, "requests that arrive together are batched"


def test_each_sequence_ends_at_its_first_stop_token_or_its_own_limit(run_dir):
    """Stop tokens picked from the free-running answers: every row is cut right after its first one,
    rows without one run to their own limit, and rows that stopped early leave the others unchanged."""
    model = SwitchModel.from_run(run_dir)
    prompts = [model.tokenizer(p)["input_ids"] for p in ["Write a haiku about rain.", "hello", "Is it?"]]
    adapters, limits = model.context.ids_of(["haiku", None, "factcheck"]), [6, 6, 3]
    free, used = model.generate_ids(prompts, limits, [], adapters)
    assert [len(row) for row in free] == limits and used.tolist() == adapters.tolist()
    stop = free[0][2]
    cut, _ = model.generate_ids(prompts, limits, [stop], adapters)
    expected = [row[:row.index(stop) + 1] if stop in row else row for row in free]
    assert cut == expected and len(cut[0]) <= 3


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
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * (2 * MAX_PROMPT_TOKENS)}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_NEW_TOKENS + 1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": True}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
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
]


def test_bad_input_gets_a_4xx_json_error_before_any_model_work(server):
    url, log = server
    batches_before = len(log.batches)
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
        assert len(log.batches) == batches_before, "no bad request reached the model"
        good = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] <= 2


def test_an_empty_last_user_message_routed_by_auto_is_answered_alone_and_in_a_batch(server):
    url, _ = server
    empty = [{"role": "user", "content": ""}]
    empty_after_turns = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "ok"}, *empty]
    for messages in (empty, empty_after_turns):
        alone = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
        assert alone.status_code == 200, alone.text
    batch = [("/v1/chat/completions", {"model": "auto", "messages": empty, "max_tokens": 2})]
    batch += [("/v1/completions", body("/v1/completions", p, "haiku")) for p in task_prompts("haiku", TOPICS[:5])]
    assert [status for status, _ in asyncio.run(send_all(url, batch, clients=len(batch)))] == [200] * len(batch)


def test_a_request_that_fails_at_run_time_fails_alone(run_dir):
    """A batch whose generate raises is retried request by request: only the faulty request gets an
    error (500, OpenAI's shape), the others of its batch are answered."""
    model = SwitchModel.from_run(run_dir)
    poison = model.tokenizer("poison")["input_ids"]  # a completion's prompt is tokenised as it is
    generate, batch_sizes = model.generate_ids, []

    def failing_for_poison(prompt_ids, *args, **kwargs):
        batch_sizes.append(len(prompt_ids))
        if poison in [list(ids) for ids in prompt_ids]:
            raise RuntimeError("injected failure")
        return generate(prompt_ids, *args, **kwargs)

    model.generate_ids = failing_for_poison
    requests = [("/v1/completions", body("/v1/completions", prompt, model_name)) for prompt, model_name in
                [("poison", "base"), ("hello", "auto"), ("Write a haiku about rain.", "haiku"), ("hi", "base")]]
    app = create_app(model, max_batch_size=len(requests), batch_window_ms=2000, max_new_tokens=8)
    with serving(app) as (url, _):
        results = asyncio.run(send_all(url, requests, clients=len(requests)))
        assert health(url)["status"] == "ok"
    assert [status for status, _ in results] == [500, 200, 200, 200], results
    assert results[0][1]["error"]["type"] == "server_error" and "injected failure" in results[0][1]["error"]["message"]
    assert batch_sizes == [4, 1, 1, 1, 1], "one batch, then each request alone"


def test_a_body_over_the_limit_gets_413_before_it_is_read(run_dir):
    app = create_app(SwitchModel.from_run(run_dir), max_body_bytes=10_000)
    with serving(app) as (url, _):
        big = json.dumps({"prompt": "word " * 400_000})  # 2 MB
        for content in (big, (big[i:i + 65536].encode() for i in range(0, len(big), 65536))):  # sized, then chunked
            response = httpx.post(f"{url}/v1/completions", content=content, timeout=30,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        fits = httpx.post(f"{url}/v1/completions", json={"prompt": "word " * 100, "max_tokens": 2}, timeout=30)
        assert fits.status_code == 200, fits.text


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
    app = create_app(SwitchModel.from_run(run_dir), max_new_tokens=8)
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


class GatedGenerate:
    """Holds every ``generate_ids`` call until released, so tests can fill the queue deterministically."""

    def __init__(self, model: SwitchModel):
        self.generate, self.entered, self.release = model.generate_ids, threading.Event(), threading.Event()
        model.generate_ids = self

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.release.wait(timeout=60), "the test never released generate"
        return self.generate(*args, **kwargs)


def wait_for(predicate, timeout: float = 30.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("condition not reached in time")


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def test_full_queue_gets_429_and_queued_requests_are_still_served(run_dir):
    model = SwitchModel.from_run(run_dir)
    gate = GatedGenerate(model)
    app = create_app(model, max_batch_size=1, batch_window_ms=0, max_new_tokens=8, max_queue=2)
    with serving(app) as (url, _), ThreadPoolExecutor(4) as pool:
        def post(prompt):
            return httpx.post(f"{url}/v1/completions", json=body("/v1/completions", prompt, "base"), timeout=60)

        running = pool.submit(post, "first")
        assert gate.entered.wait(30)
        queued = [pool.submit(post, p) for p in ("second", "third")]
        wait_for(lambda: health(url)["queued"] == 2)
        refused = post("fourth")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        gate.release.set()
        assert [f.result().status_code for f in [running, *queued]] == [200, 200, 200]
        assert post("fifth").status_code == 200, "the server keeps serving"


@pytest.mark.parametrize("drain_timeout_s, queued_status", [(30.0, 200), (0.2, 503)])
def test_shutdown_finishes_the_running_batch_and_serves_or_fails_the_queue(run_dir, drain_timeout_s, queued_status):
    """Within the drain timeout queued requests are still served; after it they get 503. The running
    batch always finishes; nothing hangs, and the port is closed for new connections."""
    model = SwitchModel.from_run(run_dir)
    gate = GatedGenerate(model)
    app = create_app(model, max_batch_size=1, batch_window_ms=0, max_new_tokens=8, drain_timeout_s=drain_timeout_s)
    with serving(app) as (url, server), ThreadPoolExecutor(3) as pool:
        def post(prompt):
            return httpx.post(f"{url}/v1/completions", json=body("/v1/completions", prompt, "haiku"), timeout=60)

        running = pool.submit(post, "first")
        assert gate.entered.wait(30)
        queued = [pool.submit(post, p) for p in ("second", "third")]
        wait_for(lambda: health(url)["queued"] == 2)
        server.should_exit = True
        wait_for(lambda: not app.state.batcher.accepting)
        if queued_status == 503:
            for future in queued:
                response = future.result(timeout=30)  # failed while the running batch still runs
                assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
        gate.release.set()
        assert running.result(timeout=30).status_code == 200
        assert [f.result(timeout=30).status_code for f in queued] == [queued_status] * 2
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{url}/v1/completions", json=body("/v1/completions", "late"), timeout=5)


def test_serve_command_listens_on_loopback_by_default():
    from switchcit import cli
    from switchcit.serving import app as serving_module

    assert "switchcit.serving.app" in cli.COMMAND_MODULES
    parser = argparse.ArgumentParser()
    serving_module.add_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "some/run"])
    assert (args.run_dir, args.host, args.port) == ("some/run", "127.0.0.1", 8000)
