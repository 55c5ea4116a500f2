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
model work: a body over ``max_body_bytes`` (413, before it is read), malformed JSON, lone surrogates,
deep nesting, missing fields or wrong types (400), an unknown model (404), ``max_tokens`` outside
``[1, max_new_tokens]`` or a prompt over ``max_prompt_tokens`` tokens (400), a full queue (429). Each
request is templated and tokenised (off the event loop) and checked before it joins a batch; a batch
that still fails is retried request by request, so only a faulty request gets its error. On shutdown
(SIGINT/SIGTERM) the server stops taking requests, finishes the running batch and what is queued within
``drain_timeout_s``, and answers 503 to requests still queued then.
"""
import argparse
import asyncio
import copy
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from switchcit.pipeline import SwitchModel
from switchcit.prompts import chat_messages_text, split_tokens
from switchcit.serving.batcher import Batcher
from switchcit.serving.openai import (
    AUTO,
    BASE_MODEL_NAME,
    MAX_BODY_BYTES,
    ApiError,
    OpenAIRequest,
    check_model,
    health_response,
    install_error_handlers,
    models_response,
    parse_request,
    read_json,
)

# The serve extra (fastapi, uvicorn) is imported where a server is built, so `switchcit` runs without it.
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations as objects.
if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

__all__ = ["BatchGenerator", "Generation", "GenerationRequest", "add_body_limit_argument", "add_command",
           "add_listen_arguments", "create_app", "make_server"]

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the server limit


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    span: tuple[int, int]  # the prompt's own tokens (chat: the last user message), what the switch reads
    model: str  # AUTO, BASE or an adapter name
    max_tokens: int


@dataclass
class Generation:
    adapter: str  # the adapter that wrote it, or BASE_MODEL_NAME
    text: str
    finish_reason: Literal["stop", "length"]
    completion_tokens: int


class BatchGenerator:
    """``run_batch`` of the server: the whole batch in one routed generate (the switch picks for the
    ``auto`` requests inside the prefill). Runs on the batcher's worker thread only."""

    def __init__(self, model: SwitchModel):
        self.model = model
        self.adapters = model.context.adapters
        self.stop_ids = model.stop_token_ids()

    def __call__(self, requests: list[GenerationRequest]) -> list[Generation]:
        names = [None if r.model in (AUTO, BASE_MODEL_NAME) else r.model for r in requests]  # the HTTP edge
        routed = torch.tensor([r.model == AUTO for r in requests])
        new_tokens, used = self.model.generate_ids([r.prompt_ids for r in requests], [r.max_tokens for r in requests],
                                                   self.stop_ids, self.model.context.ids_of(names), routed,
                                                   spans=[r.span for r in requests])
        adapters = [name or BASE_MODEL_NAME for name in self.model.adapter_names(used)]
        return [self._generation(adapter, tokens) for adapter, tokens in zip(adapters, new_tokens)]

    def _generation(self, adapter: str, tokens: list[int]) -> Generation:
        stopped = bool(tokens) and tokens[-1] in self.stop_ids
        text = self.model.tokenizer.decode(tokens[:-1] if stopped else tokens, skip_special_tokens=True)
        return Generation(adapter, text, "stop" if stopped else "length", len(tokens))


def create_app(model: SwitchModel, *, max_batch_size: int = 16, batch_window_ms: float = 10.0,
               max_prompt_tokens: int = 1024, max_new_tokens: int = 256, max_queue: int = 256,
               drain_timeout_s: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES,
               batcher_class: type[Batcher] = Batcher) -> "FastAPI":
    """The FastAPI app serving ``model``; run it with :func:`make_server` (explicit drain on shutdown).
    ``batcher_class`` decides how queued requests form batches (the benchmark's baseline overrides it)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    if min(max_prompt_tokens, max_new_tokens, max_body_bytes) < 1:
        raise ValueError("max_prompt_tokens, max_new_tokens and max_body_bytes must be at least 1")
    positions = getattr(model.model.config, "max_position_embeddings", None)
    if positions is not None and max_prompt_tokens + max_new_tokens > positions:
        raise ValueError(f"max_prompt_tokens + max_new_tokens = {max_prompt_tokens + max_new_tokens} exceeds "
                         f"the model's {positions} positions")
    generator = BatchGenerator(model)
    adapters, has_switch = generator.adapters, model.switch is not None
    reserved = {AUTO, BASE_MODEL_NAME} & set(adapters)
    if reserved:
        raise ValueError(f"adapter names {sorted(reserved)} are reserved model names: rename them")
    batcher = batcher_class(generator, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1e3,
                            max_queue=max_queue, drain_timeout_s=drain_timeout_s)
    # A fast tokenizer sets padding/truncation state on each padded call: such a call beside another
    # thread's can clash ("Already borrowed"). Requests tokenise on several threads at once, unpadded
    # (no state changes), with their own copy, so nothing the model does with its tokenizer meets them.
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
        if body.chat:  # tokenised as the pipeline tokenises a prompt in its chat template
            prompt_ids, span = split_tokens(tokenizer, chat_text(body), body.routing_text)
        else:
            prompt_ids = tokenizer(body.prompt)["input_ids"]
            span = (0, len(prompt_ids))
        param = "messages" if body.chat else "prompt"
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(prompt_ids) > max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, this server's limit is {max_prompt_tokens}",
                           param=param, code="context_length_exceeded")
        return GenerationRequest(prompt_ids, span, body.model, max_tokens)

    def chat_text(body: OpenAIRequest) -> str:
        if not tokenizer.chat_template:
            raise ApiError(400, "the base model's tokenizer has no chat template: use /v1/completions")
        try:
            return chat_messages_text(tokenizer, body.messages)
        except Exception as error:  # templates raise on conversations they refuse (e.g. role order)
            raise ApiError(400, f"the chat template refuses these messages: {str(error)[:200]}",
                           param="messages") from None

    async def complete(request: Request, chat: bool) -> dict:
        body = parse_request(await read_json(request, max_body_bytes), chat)
        prepared = await asyncio.to_thread(prepare, body)  # templating and tokenising take a while on long prompts
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
    add_body_limit_argument(p)
    p.set_defaults(run=_serve)


def add_body_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"larger request bodies get 413 before they are read (default {MAX_BODY_BYTES})")


def add_listen_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=default_port, help=f"default {default_port}")


def _serve(args: argparse.Namespace) -> None:
    model = SwitchModel.from_run(args.run_dir)
    app = create_app(model, max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                     max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                     max_queue=args.max_queue, drain_timeout_s=args.drain_timeout, max_body_bytes=args.max_body_bytes)
    make_server(app, args.host, args.port).run()
