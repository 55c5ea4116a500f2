"""``switchcit route`` against stub upstreams on loopback: auto requests go upstream under the
switch's adapter, explicit ones under their own name, ``base`` under the upstream's base-model name;
answers carry ``adapter``, streamed ones chunk by chunk as the upstream sends them; bad input never
reaches the upstream; a request whose routing fails fails alone; upstream errors come back as JSON; an
upstream that hangs or dies gives 504/502 (an error event within a stream) in a bounded time; /health
reports the upstream. The gateway's encoder holds only the layers below the switch and routes as the
whole model does.
And ``switchcit export-vllm``: the adapter folders and the exact ``vllm serve`` and ``route`` commands."""
import argparse
import asyncio
import contextlib
import json
import shlex
import socket
import threading
import time
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from serve_fixtures import TASKS, TOPICS, TRAINED_TOPICS, serving, stub_upstream, task_prompts, tiny_run  # noqa: E402

from switchcit.runs import read_run, write_run_manifest  # noqa: E402
from switchcit.serving.gateway import create_gateway, load_routing_switch  # noqa: E402
from switchcit.switch import Switch, decoder_layers, encode_features  # noqa: E402

UPSTREAM_BASE = "smollm-base"  # what the stub calls the base model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def switch(run_dir):
    run = read_run(run_dir)
    return Switch.load(run.switch, encoder=run.base)


@pytest.fixture(scope="module")
def gateway(run_dir):
    """``(gateway url, bodies the upstream received)``; the gateway's switch has the encoder
    ``switchcit route`` gives it (the layers below the switch only)."""
    received = []
    with serving(stub_upstream(received), draining=False) as (upstream_url, _):
        app = create_gateway(load_routing_switch(run_dir), list(read_run(run_dir).adapters), upstream_url,
                             upstream_base_model=UPSTREAM_BASE)
        with serving(app) as (url, _):
            yield url, received


async def post_all(url: str, requests: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=body) for path, body in requests))


def test_auto_requests_go_upstream_under_the_switch_adapter(gateway, switch):
    url, received = gateway
    prompts = [p for task in TASKS for p in task_prompts(task, TOPICS[:2])] + ["hello", "What is 2 + 2?"]
    expected = [task or "base" for task in switch.route(prompts)]  # the switch alone, one prompt batch
    assert {"base", *TASKS} <= set(expected), expected
    requests = [("/v1/completions", {"prompt": p, "max_tokens": 5, "temperature": 0.7}) for p in prompts]
    requests += [("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": p}]})
                 for p in prompts]
    received.clear()
    responses = asyncio.run(post_all(url, requests))  # together: the gateway routes them in batches

    assert [r.status_code for r in responses] == [200] * len(requests)
    adapters = [r.json()["choices"][0]["adapter"] for r in responses]
    assert adapters == expected * 2
    forwarded = {(path, json.dumps(body["messages"] if "messages" in body else body["prompt"])): body
                 for path, body in received}
    assert len(forwarded) == len(requests)
    for (path, body), adapter in zip(requests, adapters):
        sent = forwarded[path, json.dumps(body.get("messages", body.get("prompt")))]
        assert sent == body | {"model": UPSTREAM_BASE if adapter == "base" else adapter}, "only model changes"


def test_explicit_models_are_forwarded_and_listed(gateway):
    url, received = gateway
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["auto", "base", *TASKS]
    for model, upstream_model in [("simplify", "simplify"), ("base", UPSTREAM_BASE)]:
        received.clear()
        response = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "Write a haiku about rain."})
        assert response.status_code == 200
        assert response.json()["choices"][0] == {"index": 0, "text": f"written by {upstream_model}",
                                                 "finish_reason": "length", "adapter": model}
        assert received == [("/v1/completions", {"model": upstream_model, "prompt": "Write a haiku about rain."})]


@pytest.mark.parametrize("payload, status", [
    ('{"prompt": ', 400),
    ({"max_tokens": 3}, 400),
    ({"prompt": "hi", "model": "poetry"}, 404),
    ({"prompt": "hi", "max_tokens": "3"}, 400),
    ({"prompt": "hi", "stream": "yes"}, 400),
    ({"prompt": [], "model": "haiku"}, 400),
    pytest.param({"prompt": "hi", "model": "x" * 100_000}, 404, id="long-model"),  # errors quote a short prefix
    ('{"prompt": "hi", "user": "\\ud800"}', 400),  # forwarded fields must be JSON the upstream can read
    ('{"prompt": "hi", "temperature": NaN}', 400),
    ('{"prompt": "hi", "temperature": -1e999}', 400),
    pytest.param('{"prompt": "hi", "logit_bias": ' + "[" * 900 + "]" * 900 + "}", 400, id="nested-900"),
    pytest.param('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, id="nested-100000"),
    pytest.param({"prompt": "word " * 3000}, 400, id="over-2048-positions"),  # for the switch to read
    pytest.param({"prompt": "word " * 300_000}, 413, id="over-body-limit"),
    pytest.param({"prompt": "x" * 10_000_000}, 413, id="10-MB-body"),
])
def test_bad_input_is_refused_before_the_upstream(gateway, payload, status):
    url, received = gateway
    received.clear()
    content = payload if isinstance(payload, str) else json.dumps(payload)
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status and response.json()["error"]["message"]
    assert len(response.content) < 1000
    assert received == []


def test_an_empty_last_user_message_routed_by_auto_is_forwarded(gateway):
    url, received = gateway
    messages = [{"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": ""}]
    for chat in (messages[-1:], messages):
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "auto", "messages": chat}, timeout=30)
        assert response.status_code == 200, response.text


def test_a_request_whose_routing_fails_fails_alone(run_dir, switch, monkeypatch):
    """A routing batch that raises is routed again prompt by prompt: only the faulty request gets 500."""
    route, batch_sizes = switch.route, []

    def failing_for_poison(prompts):
        batch_sizes.append(len(prompts))
        if "poison" in prompts:
            raise RuntimeError("injected failure")
        return route(prompts)

    monkeypatch.setattr(switch, "route", failing_for_poison)
    prompts = ["poison", "Write a haiku about rain.", "hello", "Simplify: the rain was ameliorated."]
    received = []
    with serving(stub_upstream(received), draining=False) as (upstream_url, _):
        app = create_gateway(switch, list(read_run(run_dir).adapters), upstream_url, max_batch_size=len(prompts),
                             batch_window_ms=2000)
        with serving(app) as (url, _):
            responses = asyncio.run(post_all(url, [("/v1/completions", {"prompt": p}) for p in prompts]))
    assert [r.status_code for r in responses] == [500, 200, 200, 200]
    assert "injected failure" in responses[0].json()["error"]["message"]
    assert sorted(body["prompt"] for _, body in received) == sorted(prompts[1:])
    assert batch_sizes == [4, 1, 1, 1, 1], "one batch, then each prompt alone"


def test_upstream_errors_come_back_as_json(gateway, run_dir, switch):
    url, _ = gateway
    refused = httpx.post(f"{url}/v1/completions", json={"model": "haiku", "prompt": "hi", "max_tokens": 999})
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "max_tokens is too large"

    with serving(fastapi.FastAPI(), draining=False) as (gone_url, _):
        pass  # a port that was just closed
    app = create_gateway(switch, list(read_run(run_dir).adapters), gone_url)
    with serving(app) as (lonely_url, _):
        for stream in (False, True):  # a stream that never started is an error like any other
            response = httpx.post(f"{lonely_url}/v1/completions", json={"model": "haiku", "prompt": "hi",
                                                                         "stream": stream})
            assert response.status_code == 502 and response.json()["error"]["type"] == "upstream_error"
        assert httpx.get(f"{lonely_url}/v1/models").status_code == 200, "the gateway keeps serving"


def test_export_vllm_writes_adapters_and_prints_the_command(run_dir, tmp_path, capsys):
    from switchcit import cli
    from switchcit.serving import gateway

    assert "switchcit.serving.gateway" in cli.COMMAND_MODULES
    parser = argparse.ArgumentParser()
    gateway.add_command(parser.add_subparsers())
    out = tmp_path / "vllm"
    args = parser.parse_args(["export-vllm", str(run_dir), str(out)])
    args.run(args)
    printed = capsys.readouterr().out.splitlines()
    command = shlex.split(printed[0])
    run = read_run(run_dir)
    assert command[:3] == ["vllm", "serve", str(Path(run.base).resolve())]
    assert command[3:] == [
        "--served-model-name", "base", "--dtype", "float32", "--host", "127.0.0.1", "--port", "8000",
        "--enable-lora", "--max-loras", "3", "--max-lora-rank", "8",  # rank 4 → 8
        "--lora-modules", *[f"{task}={out.resolve() / 'adapters' / task}" for task in TASKS],
    ]
    for task in TASKS:
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / "adapters" / task / file).read_bytes() == (run.adapters[task] / file).read_bytes()
    route = ["switchcit", "route", "--upstream", "http://127.0.0.1:8000", str(Path(run_dir).resolve()),
             "--upstream-base-model", "base"]
    assert printed[1] == f"# then: {shlex.join(route)}"
    assert (out / "vllm_serve.sh").read_text() == f"#!/bin/sh\n{printed[1].replace('then', 'then, beside it')}\n" \
                                                 f"exec {printed[0]}\n"


@pytest.mark.parametrize("stored, expected", [("bfloat16", "bfloat16"), ("float16", "float16"), (None, "float32")])
def test_export_serves_the_base_model_in_its_own_dtype(run_dir, tmp_path, stored, expected):
    """vLLM's --dtype is the base model's: its config's, else its weights' (here float32)."""
    from switchcit.serving.gateway import base_dtype

    base = Path(read_run(run_dir).base)
    config = json.loads((base / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    if stored is not None:
        config["dtype"] = stored
    copy = tmp_path / "base"
    copy.mkdir()
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "model.safetensors").symlink_to(base / "model.safetensors")
    assert base_dtype(copy) == expected


def test_route_refuses_a_bad_upstream_before_loading_anything(run_dir, capsys):
    from switchcit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["route", "--upstream", "127.0.0.1:8000", str(run_dir)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "switchcit route: the upstream must be an http:// or https:// URL, got '127.0.0.1:8000'"]


# --------------------------------------------------------------------------------------------------
# The encoder: only the layers below the switch


@pytest.mark.parametrize("layer", [0, 1])
def test_the_encoder_holds_only_the_layers_below_the_switch_and_routes_as_the_whole_model(
        run_dir, tmp_path, monkeypatch, layer):
    """The switch at layer K reads embeddings and layers 0…K−1 from the safetensors, nothing else; its
    features, and so its routes, are the whole model's."""
    import safetensors
    import transformers

    run = read_run(run_dir)
    whole = transformers.AutoModelForCausalLM.from_pretrained(run.base)
    prompts = [p for task in TASKS for p in task_prompts(task, TRAINED_TOPICS)]
    switch_dir = tmp_path / "switchcit" / "switch"
    Switch.train(prompts, [t for t in TASKS for _ in task_prompts(t, TRAINED_TOPICS)], encoder=whole,
                 layer=layer).save(switch_dir)
    write_run_manifest(tmp_path / "switchcit", run.base, run.adapters, switch_dir, layer)

    read, real_safe_open = [], safetensors.safe_open

    class RecordingSafeOpen:  # what the loader reads of the checkpoint
        def __init__(self, *args, **kwargs):
            self.file = real_safe_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", RecordingSafeOpen)
    routing = load_routing_switch(tmp_path)
    monkeypatch.undo()

    layers_read = {int(name.split(".")[2]) for name in read if name.startswith("model.layers.")}
    assert layers_read == set(range(layer)) and "lm_head.weight" not in read
    assert {name for name in read if not name.startswith("model.layers.")} == {"model.embed_tokens.weight",
                                                                              "model.norm.weight"}
    held = [i for i, module in enumerate(decoder_layers(routing.encoder))
            if not any(p.is_meta for p in module.parameters())]
    assert held == list(range(layer)), "layers K…L−1 hold no memory"
    assert sum(p.numel() for p in routing.encoder.parameters() if not p.is_meta) == sum(
        p.numel() for name, p in whole.named_parameters() if name in read)

    asked = prompts + [p for task in TASKS for p in task_prompts(task, TOPICS[6:])] + ["hello", "What is 2 + 2?"]
    for ours, theirs in zip(encode_features(asked, routing.encoder, routing.tokenizer, layer),
                            encode_features(asked, whole, routing.tokenizer, layer)):
        assert torch.equal(ours, theirs)
    whole_switch = Switch.load(switch_dir, encoder=whole, tokenizer=routing.tokenizer)
    assert routing.route(asked) == whole_switch.route(asked)


# --------------------------------------------------------------------------------------------------
# Streams, and upstreams that stop


def streaming_upstream(received: list, second_chunk: threading.Event, hang_after: int | None = None):
    """An upstream that streams three completion chunks and ``data: [DONE]``; it sends the second one
    only once ``second_chunk`` is set (``"late"`` instead of ``"two"`` if that takes over 10 s). With
    ``hang_after`` it goes silent after that many chunks (0: before its answer starts) until
    ``second_chunk`` is set. ``max_tokens`` 999: 400."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def answer(request):
        payload = await request.json()
        received.append(payload)
        if payload.get("max_tokens") == 999:
            return JSONResponse({"error": {"message": "max_tokens is too large", "code": 400}}, status_code=400)
        if hang_after == 0:
            await asyncio.to_thread(second_chunk.wait, 30)
            return JSONResponse({})

        async def events():
            for index, text in enumerate(["one", "two", "three"]):
                if index == hang_after:
                    await asyncio.to_thread(second_chunk.wait, 30)
                    return
                if index == 1 and not await asyncio.to_thread(second_chunk.wait, 10):
                    text = "late"
                chunk = {"id": "cmpl-stream", "object": "text_completion", "model": payload["model"],
                         "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", answer, methods=["POST"])])


def stream_events(lines) -> list:
    """The ``data`` of each server-sent event among ``lines``: parsed JSON, or ``"[DONE]"``."""
    return [line[len("data: "):] if line == "data: [DONE]" else json.loads(line[len("data: "):])
            for line in lines if line.startswith("data: ")]


def test_streams_pass_through_chunk_by_chunk_with_the_adapter(run_dir, switch):
    received, second_chunk = [], threading.Event()
    prompt = task_prompts("haiku", TOPICS[:1])[0]
    expected = switch.route([prompt])[0] or "base"
    with serving(streaming_upstream(received, second_chunk), draining=False) as (upstream_url, _):
        app = create_gateway(switch, list(read_run(run_dir).adapters), upstream_url, stream_timeout_s=30)
        with serving(app) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
            for model, adapter in [("auto", expected), ("simplify", "simplify")]:
                second_chunk.clear()
                body = {"model": model, "prompt": prompt, "stream": True, "unknown_vllm_option": 1}
                with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"].startswith("text/event-stream")
                    lines = response.iter_lines()
                    first = next(line for line in lines if line)
                    assert json.loads(first[len("data: "):])["choices"][0]["text"] == "one"
                    second_chunk.set()  # the upstream sends the rest only now: the first chunk was not held back
                    events = stream_events([first, *lines])
                assert [e["choices"][0]["text"] for e in events[:-1]] == ["one", "two", "three"]
                assert events[-1] == "[DONE]"
                assert all(e["choices"][0]["adapter"] == adapter for e in events[:-1])
                assert received[-1] == body | {"model": "base" if adapter == "base" else adapter}

            refused = client.post("/v1/completions", json={"model": "haiku", "prompt": "hi", "stream": True,
                                                           "max_tokens": 999})
            assert refused.status_code == 400 and refused.json()["error"]["message"] == "max_tokens is too large"
            unknown = client.post("/v1/completions", json={"model": "poetry", "prompt": "hi", "stream": True})
            assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


@contextlib.contextmanager
def dying_upstream(reply: bytes):
    """An upstream that reads each request whole, sends ``reply`` (maybe nothing) and closes the
    connection: a server that dies in the middle of its answer."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with connection:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += connection.recv(65536)
                head, _, body = request.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                              if line.startswith(b"content-length:"))
                while len(body) < length:
                    body += connection.recv(65536)
                connection.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def sse_chunk(text: str) -> bytes:
    event = f"data: {json.dumps({'choices': [{'index': 0, 'text': text}]})}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)


@pytest.mark.parametrize("stops", ["dies", "hangs"])
def test_an_upstream_that_stops_mid_request_gives_an_error_in_bounded_time(run_dir, switch, stops):
    """Dies: the connection closes (502); hangs: silent past the timeout (504). Within a stream that
    has started: the chunks sent so far, an error event, then the end of the stream."""
    timeouts = {"timeout_s": 1.0, "stream_timeout_s": 1.0, "connect_timeout_s": 1.0}
    adapters = list(read_run(run_dir).adapters)
    status, code = (502, "upstream_unavailable") if stops == "dies" else (504, "upstream_timeout")
    release = threading.Event()
    with contextlib.ExitStack() as stack:
        if stops == "dies":
            whole_url = stack.enter_context(dying_upstream(b""))
            stream_url = stack.enter_context(dying_upstream(SSE_HEAD + sse_chunk("one")))
        else:
            whole_url, stream_url = (stack.enter_context(serving(streaming_upstream([], release, hang_after=chunks),
                                                                 draining=False))[0] for chunks in (0, 1))
            stack.callback(release.set)  # (runs first) lets the silent upstreams end before they shut down
        whole = stack.enter_context(serving(create_gateway(switch, adapters, whole_url, **timeouts)))[0]
        streamed = stack.enter_context(serving(create_gateway(switch, adapters, stream_url, **timeouts)))[0]

        start = time.monotonic()
        response = httpx.post(f"{whole}/v1/completions", json={"model": "haiku", "prompt": "hi"}, timeout=60)
        assert response.status_code == status, response.text
        assert response.json()["error"]["code"] == code and response.json()["error"]["type"] == "upstream_error"

        with httpx.stream("POST", f"{streamed}/v1/completions", timeout=60,
                          json={"model": "haiku", "prompt": "hi", "stream": True}) as response:
            assert response.status_code == 200
            events = stream_events(response.iter_lines())
        assert events[0]["choices"][0] == {"index": 0, "text": "one", "adapter": "haiku"} | (
            {"finish_reason": None} if stops == "hangs" else {})
        assert events[1]["error"]["code"] == code and events[1:] == [events[1], "[DONE]"]
        assert time.monotonic() - start < 20, "bounded by the timeouts, not the 600 s default"


def test_health_reports_the_upstream(run_dir, switch):
    """200 while the upstream's /health (or, without one, /v1/models) answers; 503 with the reason when not."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    def upstream(path: str, status: int) -> Starlette:
        return Starlette(routes=[Route(path, lambda request: Response(status_code=status))])

    with serving(Starlette(), draining=False) as (gone_url, _):
        pass  # a port that was just closed
    cases = [(upstream("/health", 200), 200), (upstream("/v1/models", 200), 200), (upstream("/health", 503), 503),
             (None, 503)]
    for app, status in cases:
        with contextlib.ExitStack() as stack:
            url = gone_url if app is None else stack.enter_context(serving(app, draining=False))[0]
            gateway_url = stack.enter_context(serving(create_gateway(switch, list(read_run(run_dir).adapters), url,
                                                                     connect_timeout_s=2)))[0]
            health = httpx.get(f"{gateway_url}/health", timeout=30)
        assert health.status_code == status, (app, health.text)
        if status == 200:
            assert health.json()["status"] == "ok"
        else:
            assert health.json()["status"] == "upstream_unavailable" and url in health.json()["reason"]


def test_several_prompts_are_forwarded_together_when_they_share_an_adapter(gateway, switch):
    url, received = gateway
    haiku = task_prompts("haiku", TOPICS[:2])
    mixed = [haiku[0], task_prompts("simplify", TOPICS[:1])[0]]
    assert set(switch.route(haiku)) == {"haiku"} and switch.route(mixed) == ["haiku", "simplify"]
    received.clear()
    together = httpx.post(f"{url}/v1/completions", json={"prompt": haiku}, timeout=30)
    assert together.status_code == 200 and together.json()["choices"][0]["adapter"] == "haiku"
    assert received == [("/v1/completions", {"prompt": haiku, "model": "haiku"})]
    apart = httpx.post(f"{url}/v1/completions", json={"prompt": mixed}, timeout=30)
    assert apart.status_code == 400 and apart.json()["error"]["param"] == "prompt"
    assert len(received) == 1
