"""OpenAI-compatible server for a SwitchCIT run: ``switchcit serve RUN_DIR``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
``GET /v1/models`` (``auto``, ``base`` and every adapter), ``GET /health``. ``model`` is ``"auto"``
(the default: the switch picks each prompt's adapter), an adapter's name, or ``"base"``; every choice
names the adapter that wrote it (``"adapter": "<name>"`` or ``"base"``).

Batching: requests wait in a bounded queue; the collector takes up to ``max_batch_size`` of them,
waiting at most ``batch_window_ms`` after the oldest arrived, and one worker thread generates the whole
mixed-adapter batch in one ``generate`` call (greedy, KV cache, one adapter per sequence). A batch
runs to its longest ``max_tokens``; each sequence is cut at its own ``max_tokens`` or first EOS.
Greedy decoding is causal, so the answer is the one the request gets when served alone.

Decoding is always greedy: sampling options (``temperature``, ``top_p``, …) are ignored, and
``stream: true`` or ``n > 1`` are refused. ``prompt`` is one string; chat ``content`` is a string.

Errors are OpenAI-style JSON (``{"error": {"message", "type", "param", "code"}}``) and come before any
model work: malformed JSON, missing fields or wrong types (400), an unknown model (404),
``max_tokens`` outside ``[1, max_new_tokens]`` or a prompt over ``max_prompt_tokens`` tokens (400),
a full queue (429). On shutdown (SIGINT/SIGTERM) the server stops taking requests, finishes the
running batch and what is queued within ``drain_timeout_s``, and answers 503 to requests still queued
then.
"""
import argparse
import asyncio
import copy
import json
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from switchcit.switch import SwitchModel

# The serve extra (fastapi, uvicorn) is imported where a server is built, so `switchcit` runs without it.
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations as objects.
if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

__all__ = [
    "AUTO", "BASE", "ApiError", "Batcher", "Generation", "GenerationRequest", "OpenAIRequest", "add_command",
    "check_model", "create_app", "make_server", "parse_request",
]

AUTO = "auto"  # model name: let the switch pick the adapter
BASE = "base"  # model name: no adapter
CHAT_ROLES = ("system", "user", "assistant")
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server limit


# --------------------------------------------------------------------------------------------------
# Requests and errors


class ApiError(Exception):
    """An OpenAI-style error response: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> "JSONResponse":
        from fastapi.responses import JSONResponse

        body = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass
class OpenAIRequest:
    """A checked ``/v1/completions`` (``prompt``) or ``/v1/chat/completions`` (``messages``) body."""

    chat: bool
    model: str
    max_tokens: int | None  # None: the endpoint's default
    prompt: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)

    @property
    def routing_text(self) -> str:
        """What the switch reads: the prompt, or the last user message of a chat."""
        return [m["content"] for m in self.messages if m["role"] == "user"][-1] if self.chat else self.prompt


_REQUIRED = object()
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a boolean", list: "a list"}


def _field(payload: dict, name: str, kind: type, default: Any = _REQUIRED, param: str | None = None) -> Any:
    """``payload[name]`` if it has type ``kind`` (a bool is no integer); absent or null: ``default``."""
    param = param or name
    value = payload.get(name)
    if value is None:
        if default is _REQUIRED:
            raise ApiError(400, f"{param} is required", param=param)
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, f"{param} must be {_TYPE_NAMES[kind]}, got {json.dumps(value)[:40]}", param=param)
    return value


def parse_request(payload: Any, chat: bool) -> OpenAIRequest:
    """Check a request body's fields and types (400 on the first problem). Unknown fields, sampling
    options included, are ignored: decoding is greedy."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    model = _field(payload, "model", str, AUTO)
    max_tokens = _field(payload, "max_tokens", int, None)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    if _field(payload, "stream", bool, False):
        raise ApiError(400, "streaming is not supported: leave stream unset or false", param="stream")
    if _field(payload, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if not chat:
        return OpenAIRequest(False, model, max_tokens, prompt=_field(payload, "prompt", str))
    messages = _field(payload, "messages", list)
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages.{i} must be an object with role and content", param=f"messages.{i}")
        role = _field(message, "role", str, param=f"messages.{i}.role")
        if role not in CHAT_ROLES:
            raise ApiError(400, f"messages.{i}.role must be one of {list(CHAT_ROLES)}, got {role!r}",
                           param=f"messages.{i}.role")
        _field(message, "content", str, param=f"messages.{i}.content")
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(400, "messages need at least one user message", param="messages")
    return OpenAIRequest(True, model, max_tokens,
                         messages=[{"role": m["role"], "content": m["content"]} for m in messages])


def check_model(model: str, adapters: Sequence[str], has_switch: bool) -> None:
    """``model`` must be ``auto`` (with a switch), ``base`` or an adapter."""
    if model not in (AUTO, BASE, *adapters):
        raise ApiError(404, f"unknown model {model!r}: use {AUTO!r}, {BASE!r} or an adapter {list(adapters)}",
                       param="model", code="model_not_found")
    if model == AUTO and not has_switch:
        raise ApiError(400, f"this run has no switch: name an adapter {list(adapters)} or {BASE!r}", param="model")


async def read_json(request: "Request") -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as error:  # JSONDecodeError, or bytes that are no text
        raise ApiError(400, f"malformed JSON body: {error}") from None


def install_error_handlers(app: "FastAPI") -> None:
    """Every failure answers OpenAI-style JSON, unknown routes and methods included."""
    from fastapi import Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error").response()


def models_response(adapters: Sequence[str], has_switch: bool, created: int) -> dict:
    names = ([AUTO] if has_switch else []) + [BASE, *adapters]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "switchcit"}
                                       for n in names]}


# --------------------------------------------------------------------------------------------------
# Batching


Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item]):
    item: Item
    future: asyncio.Future
    arrived: float


class Batcher(Generic[Item, Result]):
    """Bounded queue → batches → ``run_batch(items) -> results`` on one worker thread.

    Runs in the event loop (``start`` in the app's lifespan). A batch closes when it holds
    ``max_batch_size`` items or ``batch_window_s`` after its oldest item arrived. One batch runs at a
    time: the model and its routing context are not shared between threads.
    """

    def __init__(self, run_batch: Callable[[list[Item]], list[Result]], *, max_batch_size: int,
                 batch_window_s: float, max_queue: int, drain_timeout_s: float):
        for name, value in (("max_batch_size", max_batch_size), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if batch_window_s < 0 or drain_timeout_s < 0:
            raise ValueError("batch_window_s and drain_timeout_s must not be negative")
        self.run_batch = run_batch
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        self.max_queue, self.drain_timeout_s = max_queue, drain_timeout_s
        self.accepting = True
        self.in_batch = 0
        self._pending: deque[_Pending[Item]] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="switchcit-batch")
        self._collector: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        self._collector = asyncio.get_running_loop().create_task(self._collect())

    async def submit(self, item: Item) -> Result:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", code="shutting_down", kind="server_error")
        if len(self._pending) >= self.max_queue:
            raise ApiError(429, f"the queue is full ({self.max_queue} requests waiting); retry later",
                           code="queue_full", kind="rate_limit_error")
        loop = asyncio.get_running_loop()
        pending = _Pending(item, loop.create_future(), loop.time())
        self._pending.append(pending)
        self._arrived.set()
        return await pending.future

    def stop_accepting(self) -> None:
        """Shutdown starts: refuse new items; fail those still queued after the drain timeout."""
        self.accepting = False
        asyncio.get_running_loop().call_later(self.drain_timeout_s, self._fail_queued)

    async def close(self) -> None:
        self._fail_queued()
        if self._collector is not None:
            self._collector.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _fail_queued(self) -> None:
        while self._pending:
            future = self._pending.popleft().future
            if not future.done():
                future.set_exception(ApiError(503, "the server shut down before this request was served",
                                              code="shutting_down", kind="server_error"))

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.in_batch = len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, [p.item for p in batch])
                answered = list(zip(batch, results, strict=True))
            except Exception as error:  # the whole batch failed: every request says so, the server goes on
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(error)
            else:
                for pending, result in answered:
                    if not pending.future.done():  # its client may be gone
                        pending.future.set_result(result)
            finally:
                self.in_batch = 0

    async def _next_batch(self) -> list[_Pending[Item]]:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0].arrived + self.batch_window_s
        while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return [p for p in self._take_batch() if not p.future.done()]  # skip requests cancelled meanwhile

    def _take_batch(self) -> list[_Pending[Item]]:
        """Which queued items form the next batch: the oldest ones (subclasses may choose otherwise)."""
        return [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    routing_text: str  # what the switch reads
    model: str  # AUTO, BASE or an adapter name
    max_tokens: int


@dataclass
class Generation:
    adapter: str  # the adapter that wrote it, or BASE
    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int


class BatchGenerator:
    """``run_batch`` of the server: routes the ``auto`` requests of a batch with the switch (one pass),
    then generates the whole batch in one call. Runs on the batcher's worker thread only."""

    def __init__(self, model: SwitchModel):
        self.model = model
        self.adapters = [name for name in model.context.names if name is not None]
        self.stop_ids = model.stop_token_ids()

    def __call__(self, requests: list[GenerationRequest]) -> list[Generation]:
        adapters = [r.model for r in requests]
        auto = [i for i, r in enumerate(requests) if r.model == AUTO]
        if auto:
            tasks = self.model.route([requests[i].routing_text for i in auto])
            for i, task in zip(auto, tasks):
                adapters[i] = task if task in self.adapters else BASE  # unsure, or a task without adapter
        new_tokens = self.model.generate_ids([r.prompt_ids for r in requests],
                                     [None if a == BASE else a for a in adapters],
                                     [r.max_tokens for r in requests], self.stop_ids)
        return [self._generation(adapter, tokens) for adapter, tokens in zip(adapters, new_tokens)]

    def _generation(self, adapter: str, tokens: list[int]) -> Generation:
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        text = self.model.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
        return Generation(adapter, text, "stop" if stopped else "length", len(tokens))


# --------------------------------------------------------------------------------------------------
# The app


def create_app(model: SwitchModel, *, max_batch_size: int = 16, batch_window_ms: float = 10.0,
               max_prompt_tokens: int = 1024, max_new_tokens: int = 256, max_queue: int = 256,
               drain_timeout_s: float = 30.0, batcher_class: type[Batcher] = Batcher) -> "FastAPI":
    """The FastAPI app serving ``model``; run it with :func:`make_server` (explicit drain on shutdown).
    ``batcher_class`` decides how queued requests form batches (the benchmark's baseline overrides it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    if max_prompt_tokens < 1 or max_new_tokens < 1:
        raise ValueError("max_prompt_tokens and max_new_tokens must be at least 1")
    positions = getattr(model.model.config, "max_position_embeddings", None)
    if positions is not None and max_prompt_tokens + max_new_tokens > positions:
        raise ValueError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} exceeds "
                         f"the model's {positions} positions")
    generator = BatchGenerator(model)
    adapters, has_switch = generator.adapters, model.switch is not None
    reserved = {AUTO, BASE} & set(adapters)
    if reserved:
        raise ValueError(f"adapter names {sorted(reserved)} are reserved model names: rename them")
    batcher = batcher_class(generator, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1e3,
                            max_queue=max_queue, drain_timeout_s=drain_timeout_s)
    # A fast tokenizer sets padding/truncation state on each padded call (the worker thread's switch pass):
    # calls from two threads at once can clash ("Already borrowed"), so requests get their own copy.
    tokenizer = copy.deepcopy(model.tokenizer)
    created = int(time.time())

    def prepare(body: OpenAIRequest) -> GenerationRequest:
        """Everything checked, the prompt tokenised: what the batcher needs (before any model work)."""
        check_model(body.model, adapters, has_switch)
        max_tokens = body.max_tokens
        if max_tokens is None:
            max_tokens = max_new_tokens if body.chat else COMPLETION_DEFAULT_MAX_TOKENS
        if max_tokens > max_new_tokens:
            raise ApiError(400, f"max_tokens is {max_tokens}, this server's limit is {max_new_tokens}",
                           param="max_tokens")
        if body.chat:
            prompt_ids = tokenizer(chat_text(body), add_special_tokens=False)["input_ids"]  # the template has them
        else:
            prompt_ids = tokenizer(body.prompt)["input_ids"]
        param = "messages" if body.chat else "prompt"
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(prompt_ids) > max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, this server's limit is {max_prompt_tokens}",
                           param=param, code="context_length_exceeded")
        return GenerationRequest(prompt_ids, body.routing_text, body.model, max_tokens)

    def chat_text(body: OpenAIRequest) -> str:
        if not tokenizer.chat_template:
            raise ApiError(400, "the base model's tokenizer has no chat template: use /v1/completions")
        try:
            return tokenizer.apply_chat_template(body.messages, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # templates raise on conversations they refuse (e.g. role order)
            raise ApiError(400, f"the chat template refuses these messages: {error}", param="messages") from None

    async def complete(request: Request, chat: bool) -> dict:
        body = parse_request(await read_json(request), chat)
        prepared = prepare(body)
        generation = await request.app.state.batcher.submit(prepared)
        choice: dict[str, Any] = {"index": 0, "finish_reason": generation.finish_reason, "adapter": generation.adapter}
        if chat:
            choice["message"] = {"role": "assistant", "content": generation.text}
        else:
            choice |= {"text": generation.text, "logprobs": None}
        prompt_tokens = len(prepared.prompt_ids)
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": generation.completion_tokens,
                      "total_tokens": prompt_tokens + generation.completion_tokens},
        }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher.start()
        yield
        await app.state.batcher.close()

    app = FastAPI(title="switchcit", lifespan=lifespan)
    app.state.batcher = batcher
    install_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict:
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> dict:
        return await complete(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return models_response(adapters, has_switch, created)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return health_response(request.app.state.batcher)

    return app


def health_response(batcher: Batcher) -> "JSONResponse":
    from fastapi.responses import JSONResponse

    status = {"status": "ok" if batcher.accepting else "shutting_down", "queued": batcher.queued,
              "in_batch": batcher.in_batch}
    return JSONResponse(status, status_code=200 if batcher.accepting else 503)


def make_server(app: "FastAPI", host: str = "127.0.0.1", port: int = 8000, **uvicorn_options) -> "uvicorn.Server":
    """A uvicorn server for ``app`` (this module's or the gateway's) with an explicit drain: when
    shutdown starts, the app's batcher stops taking requests and fails those still queued after its
    drain timeout; uvicorn then waits for every open request to be answered."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            app.state.batcher.stop_accepting()
            await super().shutdown(sockets)

    return DrainingServer(uvicorn.Config(app, host=host, port=port, lifespan="on", **uvicorn_options))


# --------------------------------------------------------------------------------------------------
# Command line


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server for a run (switch + adapters, mixed batches)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="RUN_DIR (or RUN_DIR/switchcit) of a finished run")
    add_listen_arguments(p, default_port=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests generated together (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the oldest queued request waits for others to join its batch (default 10)")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts get 400 (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="largest max_tokens accepted (default 256)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond this get 429 (default 256)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds queued requests may still be served after shutdown starts (default 30)")
    p.set_defaults(run=_serve)


def add_listen_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=default_port, help=f"default {default_port}")


def _serve(args: argparse.Namespace) -> None:
    model = SwitchModel.from_run(args.run_dir)
    app = create_app(model, max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                     max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                     max_queue=args.max_queue, drain_timeout_s=args.drain_timeout)
    make_server(app, args.host, args.port).run()
