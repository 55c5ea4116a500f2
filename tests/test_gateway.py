"""``switchcit route`` against a stub upstream on loopback: auto requests go upstream under the
switch's adapter, explicit ones under their own name, ``base`` under the upstream's base-model name;
answers carry ``adapter``; bad input never reaches the upstream; a request whose routing fails fails
alone; upstream errors come back as JSON.
And ``switchcit export-vllm``: the adapter folders and the exact ``vllm serve`` command."""
import argparse
import asyncio
import json
import shlex
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")

from serve_fixtures import TASKS, TOPICS, serving, stub_upstream, task_prompts, tiny_run  # noqa: E402

from switchcit.runs import read_run  # noqa: E402
from switchcit.serving.gateway import create_gateway  # noqa: E402
from switchcit.switch import Switch  # noqa: E402

UPSTREAM_BASE = "smollm-base"  # what the stub calls the base model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def switch(run_dir):
    run = read_run(run_dir)
    return Switch.load(run.switch, encoder=run.base)


@pytest.fixture(scope="module")
def gateway(run_dir, switch):
    """``(gateway url, bodies the upstream received)``."""
    received = []
    with serving(stub_upstream(received), draining=False) as (upstream_url, _):
        app = create_gateway(switch, list(read_run(run_dir).adapters), upstream_url, upstream_base_model=UPSTREAM_BASE)
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
    ({"prompt": "hi", "stream": True}, 400),
    pytest.param({"prompt": "hi", "model": "x" * 100_000}, 404, id="long-model"),  # errors quote a short prefix
    ('{"prompt": "hi", "user": "\\ud800"}', 400),  # forwarded fields must be JSON the upstream can read
    ('{"prompt": "hi", "temperature": NaN}', 400),
    ('{"prompt": "hi", "temperature": -1e999}', 400),
    pytest.param('{"prompt": "hi", "logit_bias": ' + "[" * 900 + "]" * 900 + "}", 400, id="nested-900"),
    pytest.param('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, id="nested-100000"),
    pytest.param({"prompt": "word " * 3000}, 400, id="over-2048-positions"),  # for the switch to read
    pytest.param({"prompt": "word " * 300_000}, 413, id="over-body-limit"),
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
        response = httpx.post(f"{lonely_url}/v1/completions", json={"model": "haiku", "prompt": "hi"})
        assert response.status_code == 502 and response.json()["error"]["type"] == "upstream_error"
        assert httpx.get(f"{lonely_url}/health").json()["status"] == "ok", "the gateway keeps serving"


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
        "--served-model-name", "base", "--enable-lora", "--max-loras", "3", "--max-lora-rank", "8",  # rank 4 → 8
        "--lora-modules", *[f"{task}={out.resolve() / 'adapters' / task}" for task in TASKS],
    ]
    for task in TASKS:
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (out / "adapters" / task / file).read_bytes() == (run.adapters[task] / file).read_bytes()
    assert (out / "vllm_serve.sh").read_text() == f"#!/bin/sh\nexec {printed[0]}\n"
    assert printed[1].startswith("# then: switchcit route --upstream http://127.0.0.1:8000 ")
