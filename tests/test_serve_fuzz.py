"""Fuzzing the HTTP API of ``switchcit serve`` and ``switchcit route`` (hypothesis strategies over
OpenAI request bodies: valid ones, wrong types, odd Unicode, lone surrogates, nesting, unknown fields,
raw bytes): every answer is JSON in OpenAI's shape, never a 5xx, and the server is alive afterwards.
Besides the listed examples (failures found before), each run draws as many as the hypothesis profile
says (tests/conftest.py; ``HYPOTHESIS_PROFILE=thorough`` for many)."""
import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("peft")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_fixtures import TASKS, serving, stub_upstream, tiny_run  # noqa: E402

from switchcit.pipeline import SwitchModel  # noqa: E402
from switchcit.runs import read_run  # noqa: E402
from switchcit.serving.app import create_app  # noqa: E402
from switchcit.serving.gateway import create_gateway, load_routing_switch  # noqa: E402

# Any code point, lone surrogates included (json.dumps writes them as \udXXX escapes), and some often.
text = st.text(st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00", "\n", "é", "🙂"]),
               max_size=24)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text,  # NaN, ±Infinity too
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
                           max_leaves=10)
extra_fields = st.dictionaries(text | st.sampled_from(["temperature", "stop", "user", "logit_bias"]), json_values,
                               max_size=2)
models = st.sampled_from(["auto", "base", *TASKS])
well_formed = {  # the right fields and types, odd text and unknown fields: what passes the checks goes deeper
    "/v1/completions": st.fixed_dictionaries({"model": models, "prompt": text, "max_tokens": st.integers(1, 3)}),
    "/v1/chat/completions": st.fixed_dictionaries({"model": models, "max_tokens": st.integers(1, 3), "messages":
        st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": text}),
                 min_size=1, max_size=3)}),
}
anything = st.fixed_dictionaries({}, optional={
    "model": models | json_values, "prompt": json_values, "max_tokens": st.integers(-1, 3) | json_values,
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values}), max_size=2)
    | json_values, "stream": json_values, "n": json_values})


def raw(bodies):
    """Bodies as sent: JSON (with unknown fields), cut short, or bytes that are no JSON at all."""
    sent = st.tuples(bodies, extra_fields).map(lambda b: json.dumps(b[1] | b[0]).encode())
    return sent | sent.flatmap(lambda b: st.integers(0, len(b)).map(lambda cut: b[:cut])) | st.binary(max_size=64)


requests = st.one_of(*[st.tuples(st.just(path), raw(bodies | anything)) for path, bodies in well_formed.items()])


def fuzz(url: str) -> None:
    """POST the drawn bodies; every answer is OpenAI-shaped JSON below 500; the server lives on."""
    with httpx.Client(base_url=url, timeout=60) as client:
        @settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))  # a live server's pace
        @given(request=requests)
        @example(request=("/v1/completions", b'{"model": "auto", "prompt": "a \\ud800", "max_tokens": 1}'))
        @example(request=("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ""}], "max_tokens": 1}'))
        @example(request=("/v1/completions", b'{"prompt": "hi", "max_tokens": 1, "temperature": NaN}'))
        @example(request=("/v1/completions", b'{"prompt": "hi", "max_tokens": 1, "user": -1e999}'))
        @example(request=("/v1/completions", b'{"prompt": "hi", "user": ' + b"[" * 5000 + b"]" * 5000 + b"}"))
        @example(request=("/v1/completions", b"\xef\xbb\xbf{}"))
        def one(request):
            path, content = request
            response = client.post(path, content=content, headers={"content-type": "application/json"})
            assert response.status_code < 500, (path, content, response.text)
            if response.headers["content-type"].startswith("text/event-stream"):  # "stream": true
                assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n"), response.text
                return
            answer = response.json()
            if response.status_code == 200:
                assert answer["choices"][0]["adapter"] in ("base", *TASKS)
            else:
                assert answer["error"]["message"] and len(response.content) < 1000, response.text

        one()
        assert client.get("/health").json()["status"] == "ok"
        alive = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2})
        assert alive.status_code == 200, alive.text


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_fuzzed_requests_to_the_server(run_dir):
    app = create_app(SwitchModel.from_run(run_dir), max_model_len=260)
    with serving(app) as (url, _):
        fuzz(url)


def test_fuzzed_requests_to_the_gateway(run_dir):
    switch = load_routing_switch(run_dir)  # as `switchcit route` loads it: the layers below the switch only
    with serving(stub_upstream([]), draining=False) as (upstream_url, _):
        with serving(create_gateway(switch, list(read_run(run_dir).adapters), upstream_url)) as (url, _):
            fuzz(url)
