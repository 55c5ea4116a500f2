"""OpenAI-compatible server for a SwitchCIT run: ``switchcit serve RUN_DIR``.

Endpoints (as vLLM's): ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat
template), ``GET /v1/models`` (``auto``, ``base`` and every adapter), ``POST /v1/load_lora_adapter``
and ``POST /v1/unload_lora_adapter`` (``lora_name``, ``lora_path``), ``POST /v1/tasks`` (a new task
while serving: ``name``, ``lora_path`` and its retained ``prompts``; the switch learns it and ``auto``
routes to it), ``GET /health``, ``GET /metrics`` (Prometheus). ``model`` is ``"auto"`` (the default:
the switch picks each prompt's adapter inside the prefill), an adapter's name, or ``"base"``; every
choice names the adapter that wrote it (``"adapter"``).

Generation: :class:`switchcit.engine.Engine` on one engine thread — continuous batching over a
preallocated KV cache: at every step finished sequences leave and waiting ones join, adapters mixed.
Options: ``max_tokens``, ``temperature`` (0: greedy), ``top_p``, ``top_k``, ``seed``, ``stop``
(strings; the text ends before the first), ``n``, a list of prompts in ``/v1/completions``,
``stream`` (server-sent events; ``stream_options.include_usage`` adds usage to the last chunk).
Anything else OpenAI defines gets a 400 naming it (:mod:`switchcit.serving.protocol`).

Limits: a prompt and its ``max_tokens`` fit ``--max-model-len`` (default: the model's positions, or
what ``--kv-cache-memory-bytes`` holds for ``--max-num-seqs`` sequences); ``max_tokens`` defaults to
16 for completions (OpenAI's default) and to the rest of the context for chat (vLLM's).

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) and come before any
model work: a body over ``--max-body-bytes`` (413), malformed JSON or a bad field (400), an unknown
model (404), a missing or wrong API key (401, with ``--api-key``), a full queue (429). A client that
disconnects from a stream frees its slot. On SIGTERM/SIGINT the server stops taking requests (503),
lets running and queued ones finish within ``--drain-timeout`` seconds, and aborts the rest.
"""
import argparse
import asyncio
import copy
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from switchcit.engine import FINISH_ABORT, FINISH_ERROR, Engine, EngineRequest, SamplingParams, kv_bytes_per_token
from switchcit.pipeline import SwitchModel
from switchcit.prompts import chat_messages_text, split_tokens, template_head
from switchcit.serving.openai import (
    AUTO,
    BASE_MODEL_NAME,
    MAX_BODY_BYTES,
    ApiError,
    check_model,
    install_error_handlers,
    models_response,
    quote,
    read_json,
)
from switchcit.serving.protocol import ChatCompletionRequest, OpenAIRequest, parse_request

# The serve extra (fastapi, uvicorn, prometheus_client) is imported where a server is built, so
# `switchcit` runs without it. No `from __future__ import annotations`: FastAPI reads annotations.
if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

__all__ = ["AsyncEngine", "TextStream", "add_command", "add_listen_arguments", "create_app", "default_max_model_len",
           "make_server"]

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: the rest of the context
DEFAULT_KV_CACHE_BYTES = 1 << 30


def default_max_model_len(config, dtype: torch.dtype, max_num_seqs: int, kv_cache_bytes: int) -> int:
    """The longest sequence: the model's positions, or less when ``max_num_seqs`` of them would not fit
    ``kv_cache_bytes``."""
    positions = getattr(config, "max_position_embeddings", None) or 2048
    return min(positions, kv_cache_bytes // (max_num_seqs * kv_bytes_per_token(config, dtype)))


# --------------------------------------------------------------------------------------------------
# Text: token ids → text deltas, stop strings


class TextStream:
    """One choice's text as its tokens arrive: deltas that never split a character (detokenised over a
    short window, as vLLM does), cut before the first stop string, holding back a tail that may still
    become one."""

    def __init__(self, tokenizer, stop_strings: list[str], stop_ids: list[int]):
        self.tokenizer, self.stop_strings, self.stop_ids = tokenizer, stop_strings, set(stop_ids)
        self.tokens: list[int] = []
        self.decoded = ""  # the text of tokens[:read]
        self.text = ""  # what has been released
        self.stopped = False  # a stop string was found
        self._prefix = self._read = 0

    def add(self, tokens: list[int]) -> str:
        """The new text ``tokens`` make sendable."""
        self.tokens += [t for t in tokens if t not in self.stop_ids]
        self._detokenise(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """What was held back, once no more tokens come."""
        self._detokenise(final=True)
        return self._release(final=True)

    def _detokenise(self, final: bool) -> None:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        before, now = decode(self.tokens[self._prefix : self._read]), decode(self.tokens[self._prefix :])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):  # else: a character still coming
            self.decoded += now[len(before) :]
            self._prefix, self._read = self._read, len(self.tokens)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self.decoded
        for stop in self.stop_strings:
            at = text.find(stop, max(0, len(self.text) - len(stop) + 1))
            if at >= 0:
                text, self.stopped = text[:at], True
        if not (self.stopped or final):
            text = text[: len(text) - max((k for stop in self.stop_strings for k in range(1, len(stop))
                                           if text.endswith(stop[:k])), default=0)]
        delta = text[len(self.text) :]
        self.text += delta
        return delta


# --------------------------------------------------------------------------------------------------
# The engine thread and the event loop


@dataclass
class _Choice:
    index: int
    request: EngineRequest
    text: TextStream
    adapter_name: str = BASE_MODEL_NAME  # the adapter that writes it (the HTTP edge's name)
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    last_token: float | None = None


class AsyncEngine:
    """The engine on its own thread, fed from the event loop: :meth:`generate` queues one request's
    choices and yields ``(choice, delta)`` as tokens arrive; leaving the iterator early (a client gone)
    aborts what is still running."""

    def __init__(self, engine: Engine, metrics: "_Metrics", max_queue: int, drain_timeout_s: float):
        self.engine, self.metrics = engine, metrics
        self.max_queue, self.drain_timeout_s = max_queue, drain_timeout_s
        self.accepting = True
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="switchcit-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def close(self) -> None:
        self._stopped = True
        self.engine.wakeup.set()
        await asyncio.to_thread(self._thread.join, 30)

    def stop_accepting(self) -> None:
        """Shutdown starts: refuse new requests; abort what still runs after the drain timeout."""
        self.accepting = False
        asyncio.get_running_loop().call_later(self.drain_timeout_s, self._abort_all)

    def _abort_all(self) -> None:
        for request in [*self.engine.running, *self.engine.waiting]:
            self.engine.abort(request)

    def _run(self) -> None:
        engine = self.engine
        while not self._stopped:
            engine.wakeup.clear()
            if engine.has_work:
                engine.step()
            else:
                engine.wakeup.wait(1.0)

    async def call(self, function: Callable[[], Any]) -> Any:
        """``function()`` on the engine thread, between two steps."""
        return await asyncio.wrap_future(self.engine.call(function))

    async def generate(self, requests: list[EngineRequest], stream_texts: list[TextStream]
                       ) -> AsyncIterator[tuple[_Choice, str]]:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
        if self.engine.num_waiting + len(requests) > self.max_queue:
            raise ApiError(429, f"the queue is full ({self.engine.num_waiting} requests waiting); retry later",
                           code="queue_full", kind="rate_limit_error")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        choices = []
        for index, (request, text) in enumerate(zip(requests, stream_texts)):
            request.emit = _emitter(loop, events, index)
            choices.append(_Choice(index, request, text))
        for choice in choices:
            self.engine.add(choice.request)
        unfinished = len(choices)
        try:
            while unfinished:
                index, tokens, finish_reason, adapter = await events.get()
                choice = choices[index]
                if choice.finish_reason is not None:
                    continue  # a stop string ended it; the engine's own end follows
                now = time.perf_counter()
                if tokens:
                    self.metrics.tokens(choice, now, len(tokens))
                choice.adapter_name = self.engine.model.context.names[adapter] if adapter >= 0 else BASE_MODEL_NAME
                delta = choice.text.add(tokens)
                if choice.text.stopped and finish_reason is None:
                    self.engine.abort(choice.request)
                    finish_reason = "stop"
                if finish_reason is not None:
                    if finish_reason == FINISH_ERROR:
                        raise ApiError(500, f"generation failed: {type(choice.request.error).__name__}: "
                                            f"{str(choice.request.error)[:200]}", kind="server_error")
                    if finish_reason == FINISH_ABORT:
                        raise ApiError(503, "the server shut down before this request finished",
                                       code="shutting_down", kind="server_error")
                    delta += choice.text.finish()
                    choice.finish_reason = finish_reason
                    unfinished -= 1
                    self.metrics.finished(choice)
                yield choice, delta
        finally:
            for choice in choices:
                if choice.finish_reason is None:
                    self.engine.abort(choice.request)


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int):
    def emit(tokens: list[int], finish_reason: str | None, adapter: int) -> None:  # on the engine thread
        loop.call_soon_threadsafe(events.put_nowait, (index, tokens, finish_reason, adapter))

    return emit


class _Metrics:
    """Prometheus metrics, named as vLLM's (``switchcit:`` for ``vllm:``), in the app's own registry."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        Gauge("switchcit:num_requests_waiting", "Requests waiting for a slot", registry=registry).set_function(
            lambda: engine.num_waiting)
        Gauge("switchcit:num_requests_running", "Sequences in the running batch", registry=registry).set_function(
            lambda: len(engine.running))
        self.prompt_tokens = Counter("switchcit:prompt_tokens", "Prefill tokens processed", registry=registry)
        self.generation_tokens = Counter("switchcit:generation_tokens", "Tokens generated", registry=registry)
        self.requests = Counter("switchcit:request_success", "Finished sequences by adapter and finish reason",
                                ["adapter", "finished_reason"], registry=registry)
        buckets = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
        self.time_to_first_token = Histogram("switchcit:time_to_first_token_seconds", "Time to first token",
                                             buckets=buckets, registry=registry)
        self.inter_token_latency = Histogram("switchcit:inter_token_latency_seconds", "Time between tokens",
                                             buckets=buckets, registry=registry)

    def tokens(self, choice: _Choice, now: float, count: int) -> None:
        if choice.last_token is None:
            self.time_to_first_token.observe(now - choice.started)
        else:
            self.inter_token_latency.observe(now - choice.last_token)
        choice.last_token = now
        self.generation_tokens.inc(count)

    def finished(self, choice: _Choice) -> None:
        self.prompt_tokens.inc(len(choice.request.prompt_ids))
        self.requests.labels(choice.adapter_name, choice.finish_reason).inc()


# --------------------------------------------------------------------------------------------------
# The app


def create_app(model: SwitchModel, *, max_num_seqs: int = 16, max_model_len: int | None = None,
               kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_BYTES, max_num_batched_tokens: int = 4096,
               max_queue: int = 1024, drain_timeout_s: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES,
               api_key: str | None = None) -> "FastAPI":
    """The FastAPI app serving ``model``; run it with :func:`make_server` (explicit drain on shutdown).
    Raises ``ValueError`` for limits the model cannot meet."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

    network = model.network
    dtype = next(network.parameters()).dtype
    positions = getattr(network.config, "max_position_embeddings", None)
    if max_model_len is None:
        max_model_len = default_max_model_len(network.config, dtype, max_num_seqs, kv_cache_memory_bytes)
    if positions is not None and max_model_len > positions:
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's {positions} positions")
    if max_model_len < 2:
        raise ValueError(f"max_model_len is {max_model_len}: {max_num_seqs} sequences do not fit "
                         f"{kv_cache_memory_bytes} bytes of KV cache; lower --max-num-seqs or raise the memory")
    if max_body_bytes < 1 or max_queue < 1:
        raise ValueError("max_body_bytes and max_queue must be at least 1")
    reserved = {AUTO, BASE_MODEL_NAME} & set(model.context.adapters)
    if reserved:
        raise ValueError(f"adapter names {sorted(reserved)} are reserved model names: rename them")
    engine = Engine(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                    max_num_batched_tokens=max_num_batched_tokens, prefix_ids=template_head(model.tokenizer))
    metrics = _Metrics(engine)
    runner = AsyncEngine(engine, metrics, max_queue, drain_timeout_s)
    # Requests tokenise on several threads at once with their own copy of the tokenizer: a fast
    # tokenizer's padded calls change its state, which must not meet the model's use of it.
    tokenizer = copy.deepcopy(model.tokenizer)
    stop_ids = engine.stop_ids
    created = int(time.time())
    unloading: set[str] = set()
    updates = asyncio.Lock()  # one adapter or task change at a time

    def served_adapters() -> list[str]:
        return [name for name in model.context.adapters if name not in unloading]

    def tokenise(body: OpenAIRequest) -> list[tuple[list[int], tuple[int, int]]]:
        """Each prompt's token ids and its own tokens' span (what the switch reads)."""
        if isinstance(body, ChatCompletionRequest):
            if not tokenizer.chat_template:
                raise ApiError(400, "the base model's tokenizer has no chat template: use /v1/completions")
            try:
                text = chat_messages_text(tokenizer, body.conversation)
            except Exception as error:  # templates raise on conversations they refuse (e.g. role order)
                raise ApiError(400, f"the chat template refuses these messages: {str(error)[:200]}",
                               param="messages") from None
            return [split_tokens(tokenizer, text, body.routing_text)]
        rows = [tokenizer(prompt)["input_ids"] for prompt in body.prompts]
        return [(row, (0, len(row))) for row in rows]

    def prepare(body: OpenAIRequest) -> tuple[list[EngineRequest], list[TextStream], list[int]]:
        """The engine requests of ``body`` (n per prompt), checked before any model work."""
        check_model(body.model, served_adapters(), model.switch is not None)
        param = "messages" if body.chat else "prompt"
        prompts = tokenise(body)
        adapter = -1 if body.model in (AUTO, BASE_MODEL_NAME) else model.context.id_of(body.model)
        requests, texts = [], []
        for row, span in prompts:
            if not row:
                raise ApiError(400, "the prompt is empty", param=param)
            room = max_model_len - len(row)
            if room < 1:
                raise ApiError(400, f"the prompt has {len(row)} tokens; this model's context is {max_model_len}",
                               param=param, code="context_length_exceeded")
            max_tokens = body.max_tokens or (room if body.chat else min(room, COMPLETION_DEFAULT_MAX_TOKENS))
            if max_tokens > room:
                raise ApiError(400, f"max_tokens is {max_tokens} but the prompt has {len(row)} tokens of this "
                                    f"model's {max_model_len}", param="max_tokens", code="context_length_exceeded")
            for choice in range(body.n):
                seed = None if body.seed is None else body.seed + choice
                params = SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, seed)
                requests.append(EngineRequest(row, params, emit=None, adapter=adapter, routed=body.model == AUTO,
                                              span=span))
                texts.append(TextStream(tokenizer, body.stop_strings, stop_ids))
        return requests, texts, [len(row) for row, _ in prompts]

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def complete(request: Request, chat: bool):
        body = parse_request(await read_json(request, max_body_bytes), chat)
        requests, texts, prompt_lengths = await asyncio.to_thread(prepare, body)
        prompt_tokens = sum(prompt_lengths)  # each prompt once, whatever n is
        kind = "chat.completion" if chat else "text_completion"
        answer_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {"id": answer_id, "created": int(time.time()), "model": body.model}
        events = runner.generate(requests, texts)
        if body.stream:
            first = await _first_or_error(events)  # errors before the first token keep their status
            return StreamingResponse(_sse(stream_chunks(body, head, kind, first, events, requests, prompt_tokens)),
                                     media_type="text/event-stream")
        finished = {}
        async for choice, _ in events:
            if choice.finish_reason is not None:
                finished[choice.index] = choice
        choices = []
        for index in range(len(requests)):
            choice = finished[index]
            entry: dict[str, Any] = {"index": index, "finish_reason": choice.finish_reason,
                                     "adapter": choice.adapter_name}
            if chat:
                entry["message"] = {"role": "assistant", "content": choice.text.text}
            else:
                entry |= {"text": choice.text.text, "logprobs": None}
            choices.append(entry)
        completion_tokens = sum(len(r.output) for r in requests)
        return head | {"object": kind, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def stream_chunks(body, head, kind, first, events, requests, prompt_tokens) -> AsyncIterator[dict]:
        chat = body.chat
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        started = set()
        try:
            async for choice, delta in _chain(first, events):
                entry: dict[str, Any] = {"index": choice.index, "finish_reason": choice.finish_reason,
                                         "adapter": choice.adapter_name}
                if chat:
                    entry["delta"] = {"content": delta} if choice.index in started else {"role": "assistant",
                                                                                       "content": delta}
                else:
                    entry |= {"text": delta, "logprobs": None}
                first_of_choice = choice.index not in started
                started.add(choice.index)
                if delta or choice.finish_reason is not None or (chat and first_of_choice):
                    yield head | {"object": chunk_kind, "choices": [entry]} | (
                        {"usage": None} if body.include_usage else {})
        except ApiError as error:  # mid-stream: an error event ends the stream
            yield {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
            return
        if body.include_usage:
            completion_tokens = sum(len(r.output) for r in requests)
            yield head | {"object": chunk_kind, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    async def load_adapter(name: str, path: str) -> None:
        from switchcit.adapters import install_adapters, read_adapter

        if name in (AUTO, BASE_MODEL_NAME):
            raise ApiError(400, f"{name!r} is a reserved model name", param="lora_name")
        if name in model.context.adapters:
            raise ApiError(400, f"the adapter {quote(name)} is already loaded", param="lora_name")
        try:  # read and checked off the engine thread; only the copy into the bank runs between two steps
            adapter = await asyncio.to_thread(read_adapter, model.model, name, Path(path))
        except (OSError, ValueError, KeyError) as error:
            raise ApiError(400, f"cannot load {quote(path)}: {str(error)[:200]}", param="lora_path") from None
        await runner.call(lambda: install_adapters(model.model, [adapter]))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await runner.close()

    app = FastAPI(title="switchcit", lifespan=lifespan)
    app.state.engine = runner
    app.state.stop_accepting = runner.stop_accepting
    install_error_handlers(app)

    if api_key is not None:
        @app.middleware("http")
        async def require_api_key(request: Request, call_next):
            given = request.headers.get("authorization", "")
            if request.url.path.startswith("/v1") and not hmac.compare_digest(given, f"Bearer {api_key}"):
                return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                                code="invalid_api_key", kind="authentication_error").response()
            return await call_next(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return models_response(served_adapters(), model.switch is not None, created)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> PlainTextResponse:
        fields = _fields(await read_json(request, max_body_bytes), ("lora_name", "lora_path"))
        async with updates:
            await load_adapter(fields["lora_name"], fields["lora_path"])
        return PlainTextResponse(f"Success: LoRA adapter '{fields['lora_name']}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> PlainTextResponse:
        from switchcit.adapters import unload_adapter

        name = _fields(await read_json(request, max_body_bytes), ("lora_name",))["lora_name"]
        async with updates:
            if name not in served_adapters():
                raise ApiError(404, f"no adapter {quote(name)} is loaded", param="lora_name", code="model_not_found")
            unloading.add(name)  # new requests for it get 404; those in flight finish with it
            try:
                adapter = model.context.id_of(name)
                while any(r.adapter == adapter for r in [*engine.running, *engine.waiting]):
                    await asyncio.sleep(0.05)
                await runner.call(lambda: unload_adapter(model.model, name))
            finally:
                unloading.discard(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/tasks")
    async def add_task(request: Request) -> dict:
        """A new task while serving: its adapter joins the bank, the switch learns its prompts."""
        from switchcit.switch import encode_features

        payload = await read_json(request, max_body_bytes)
        fields = _fields(payload, ("name", "lora_path"))
        prompts = payload.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ApiError(400, "prompts must be a non-empty list of non-empty strings", param="prompts")
        switch, name = model.switch, fields["name"]
        if switch is None:
            raise ApiError(400, "this run has no switch: load the adapter with /v1/load_lora_adapter")
        async with updates:
            try:
                all_prompts, labels = switch.with_task(name, prompts)
            except ValueError as error:
                raise ApiError(400, str(error), param="name") from None
            await load_adapter(name, fields["lora_path"])

            def encode():  # on the engine thread: the model is the switch's encoder
                model.context.assign(None)
                return encode_features(all_prompts, switch.encoder, switch.tokenizer, switch.layer)

            features = await runner.call(encode)
            trained = await asyncio.to_thread(switch.trained_on, all_prompts, labels, *features)

            def install():
                model.switch = trained

            await runner.call(install)
        return {"object": "task", "name": name, "tasks": trained.tasks, "adapters": model.context.adapters}

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {"status": "ok" if runner.accepting else "shutting_down", "waiting": engine.num_waiting,
                  "running": len(engine.running)}
        return JSONResponse(status, status_code=200 if runner.accepting else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _fields(payload: Any, names: tuple[str, ...]) -> dict[str, str]:
    """Required non-empty string fields of a JSON object body (400 naming the first one wrong)."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    for name in names:
        if not isinstance(payload.get(name), str) or not payload[name]:
            raise ApiError(400, f"{name} must be a non-empty string", param=name)
    return {name: payload[name] for name in names}


async def _first_or_error(events: AsyncIterator) -> tuple | None:
    """The first event of a stream (errors raised here still answer with their status)."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first: tuple | None, events: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for event in events:
        yield event


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


def make_server(app: "FastAPI", host: str = "127.0.0.1", port: int = 8000, **uvicorn_options) -> "uvicorn.Server":
    """A uvicorn server for ``app`` (this module's or the gateway's) with an explicit drain: when
    shutdown starts, the app stops taking requests and ends those still open after its drain timeout;
    uvicorn then waits for every open request to be answered."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            stop_accepting = getattr(app.state, "stop_accepting", None) or app.state.batcher.stop_accepting
            stop_accepting()
            await super().shutdown(sockets)

    return DrainingServer(uvicorn.Config(app, host=host, port=port, lifespan="on", **uvicorn_options))


# --------------------------------------------------------------------------------------------------
# Command line


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server for a run (switch + adapters, continuous "
                                            "batching)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="RUN_DIR (or RUN_DIR/switchcit) of a finished run")
    add_listen_arguments(p, default_port=8000)
    add_model_arguments(p)
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences generated together: KV cache slots "
                                                                 "(default 16)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + answer tokens of one sequence (default: the model's positions, or what the KV "
                        "cache memory holds for --max-num-seqs sequences)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=DEFAULT_KV_CACHE_BYTES,
                   help=f"KV cache size, allocated at start (default {DEFAULT_KV_CACHE_BYTES})")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096,
                   help="prompt tokens one step takes (default 4096)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting beyond this get 429 (default 1024)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds requests may still run after shutdown starts (default 30)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="CPU threads of the model's ops (default: the cores less one, here %(default)s, which the "
                        "HTTP server and its clients keep, as vLLM's CPU backend does)")
    add_body_limit_argument(p)
    p.set_defaults(run=_serve)


def default_threads() -> int:
    """The cores torch uses less one, at least one: an op waits for all its threads, so one that the
    event loop or a client preempts stalls the whole step (benchmarks/results/serve-cpu.md)."""
    return max(1, torch.get_num_threads() - 1)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="model weights and KV cache (default float32)")


def add_body_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 before they are read (default {MAX_BODY_BYTES})")


def add_listen_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=default_port, help=f"default {default_port}")


def _serve(args: argparse.Namespace) -> None:
    from switchcit.cli import command_error

    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        model = SwitchModel.from_run(args.run_dir, device=args.device, dtype=getattr(torch, args.dtype))
        app = create_app(model, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                         kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_queue=args.max_queue,
                         drain_timeout_s=args.drain_timeout, max_body_bytes=args.max_body_bytes, api_key=args.api_key)
    except (ValueError, OSError, RuntimeError) as error:
        command_error("serve", error)
    torch.set_num_threads(args.threads)
    make_server(app, args.host, args.port).run()

