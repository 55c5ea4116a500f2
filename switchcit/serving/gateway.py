"""Scale-out: the switch in front of a multi-LoRA server such as vLLM.

``switchcit route --upstream URL RUN_DIR``: an OpenAI-compatible gateway that runs only the switch
(the base model's features, no generation) and forwards each request to ``URL`` with ``model`` set to
the prompt's adapter, or to the upstream's name for the base model; every choice of the answer gets
``"adapter"``. Endpoints, model names (``auto``, ``base``, the adapters) and input checks are those of
``switchcit serve`` (no streaming, ``n`` = 1); everything else in the body (``max_tokens``, sampling
options…) goes to the upstream as sent, and its answer, errors included, comes back with its status.
Requests for ``auto`` that arrive together are routed in one batch, each checked before it joins one
(its routing text tokenised as the switch reads it, at most ``--max-prompt-tokens``); a batch that
still fails is routed again prompt by prompt, so only a faulty request gets its error.

``switchcit export-vllm RUN_DIR OUT_DIR``: copies the run's adapters to ``OUT_DIR/adapters/<task>/``
(PEFT folders, as vLLM loads them) and prints — and writes to ``OUT_DIR/vllm_serve.sh`` — the
``vllm serve`` command that serves the base model and every adapter in mixed batches, followed by the
matching ``switchcit route`` command.
"""
import argparse
import asyncio
import copy
import shlex
import shutil
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from switchcit.prompts import prompt_tokens
from switchcit.serving.app import add_body_limit_argument, add_listen_arguments, make_server
from switchcit.serving.batcher import Batcher
from switchcit.serving.openai import (
    AUTO,
    BASE_MODEL_NAME,
    MAX_BODY_BYTES,
    ApiError,
    check_model,
    health_response,
    install_error_handlers,
    models_response,
    parse_request,
    read_json,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from switchcit.switch import Switch

__all__ = ["add_command", "create_gateway", "export_vllm", "vllm_max_lora_rank"]

# The values vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
UPSTREAM_BASE_MODEL = "base"  # the base model's name upstream: the exported command serves it under this name


def create_gateway(switch: "Switch", adapters: Sequence[str], upstream: str, *,
                   upstream_base_model: str = UPSTREAM_BASE_MODEL, max_batch_size: int = 32,
                   batch_window_ms: float = 5.0, max_queue: int = 1024, timeout_s: float = 600.0,
                   drain_timeout_s: float = 30.0, max_prompt_tokens: int | None = None,
                   max_body_bytes: int = MAX_BODY_BYTES) -> "FastAPI":
    """The gateway app: ``switch.route(prompts)`` (with its encoder) picks a task, or ``None`` when
    unsure, per prompt; tasks without an adapter go to the base model. ``max_prompt_tokens``: the
    longest routing text the switch reads (default: the base model's positions). Run it with
    :func:`switchcit.serving.app.make_server`."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    adapters = list(adapters)
    max_prompt_tokens = max_prompt_tokens or getattr(switch.encoder.config, "max_position_embeddings", None)
    tokenizer = copy.deepcopy(switch.tokenizer)  # requests tokenise on other threads than the switch's (see app.py)

    def check_routing_text(text: str, param: str) -> None:
        """What the switch will read, tokenised as it does: no longer than ``max_prompt_tokens``."""
        tokens = len(prompt_tokens(tokenizer, text)[0])
        if max_prompt_tokens is not None and tokens > max_prompt_tokens:
            raise ApiError(400, f"the text the switch reads has {tokens} tokens, this gateway's limit is "
                                f"{max_prompt_tokens}", param=param, code="context_length_exceeded")

    def route_batch(prompts: list[str]) -> list[str]:
        return [task if task in adapters else BASE_MODEL_NAME for task in switch.route(prompts)]

    batcher = Batcher(route_batch, max_batch_size=max_batch_size, batch_window_s=batch_window_ms / 1e3,
                      max_queue=max_queue, drain_timeout_s=drain_timeout_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with httpx.AsyncClient(base_url=upstream, timeout=timeout_s) as client:
            app.state.client = client
            batcher.start()
            yield
            await batcher.close()

    app = FastAPI(title="switchcit gateway", lifespan=lifespan)
    app.state.batcher = batcher
    install_error_handlers(app)

    async def forward(request: Request, path: str, chat: bool) -> JSONResponse:
        payload = await read_json(request, max_body_bytes)
        body = parse_request(payload, chat)
        check_model(body.model, adapters, has_switch=True)
        adapter = body.model
        if body.model == AUTO:
            await asyncio.to_thread(check_routing_text, body.routing_text, "messages" if chat else "prompt")
            adapter = await batcher.submit(body.routing_text)
        upstream_model = upstream_base_model if adapter == BASE_MODEL_NAME else adapter
        try:
            response = await request.app.state.client.post(path, json=payload | {"model": upstream_model})
        except httpx.TimeoutException:
            raise ApiError(504, f"the upstream {upstream} did not answer within {timeout_s} s",
                           kind="upstream_error") from None
        except httpx.HTTPError as error:
            raise ApiError(502, f"the upstream {upstream} is unreachable: {error!r}", kind="upstream_error") from None
        try:
            answer = response.json()
        except ValueError:
            raise ApiError(502, f"the upstream answered {response.status_code} without JSON",
                           kind="upstream_error") from None
        if response.is_success and isinstance(answer, dict):
            for choice in answer.get("choices", []):
                choice["adapter"] = adapter
        return JSONResponse(answer, status_code=response.status_code)

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        return await forward(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        return await forward(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return models_response(adapters, True, created)

    @app.get("/health")
    async def health() -> JSONResponse:
        return health_response(batcher)

    return app


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")


def _adapter_rank(folder: Path) -> int:
    """The largest rank of a PEFT adapter, read from its weights' shapes (``rank_pattern`` included)."""
    from safetensors import safe_open

    from switchcit.adapters import PEFT_WEIGHTS

    with safe_open(str(folder / PEFT_WEIGHTS), framework="pt") as weights:
        return max(weights.get_slice(key).get_shape()[0] for key in weights.keys() if ".lora_A." in key)


def export_vllm(run_dir: str | Path, out_dir: str | Path, served_model_name: str = UPSTREAM_BASE_MODEL) -> list[str]:
    """Copy the run's adapters to ``out_dir/adapters/<task>/``; returns the ``vllm serve`` command
    (argv) serving the base model as ``served_model_name`` and every adapter under its task's name,
    all of them allowed in one batch."""
    from switchcit.runs import read_run

    run = read_run(run_dir)
    adapters_dir = Path(out_dir).resolve() / "adapters"
    for task, folder in run.adapters.items():
        shutil.copytree(folder, adapters_dir / task, dirs_exist_ok=True)
    rank = max(_adapter_rank(folder) for folder in run.adapters.values())
    base = str(Path(run.base).resolve()) if Path(run.base).exists() else run.base  # a folder, or a hub id
    return [
        "vllm", "serve", base, "--served-model-name", served_model_name, "--enable-lora",
        "--max-loras", str(len(run.adapters)), "--max-lora-rank", str(vllm_max_lora_rank(rank)),
        "--lora-modules", *[f"{task}={adapters_dir / task}" for task in run.adapters],
    ]


# --------------------------------------------------------------------------------------------------
# Command line


def add_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("route", help="OpenAI-compatible gateway: the switch, forwarding to a multi-LoRA "
                                            "server (vLLM)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="RUN_DIR (or RUN_DIR/switchcit) of a finished run with a switch")
    p.add_argument("--upstream", required=True, help="base URL of the multi-LoRA server, e.g. http://127.0.0.1:8000")
    p.add_argument("--upstream-base-model", default=UPSTREAM_BASE_MODEL,
                   help=f"the upstream's name for the base model (default {UPSTREAM_BASE_MODEL!r}, as export-vllm "
                        "serves it)")
    add_listen_arguments(p, default_port=8080)
    p.add_argument("--max-batch-size", type=int, default=32, help="prompts routed together (default 32)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="routing batch window (default 5)")
    p.add_argument("--max-queue", type=int, default=1024, help="prompts waiting beyond this get 429 (default 1024)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the upstream (default 600)")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer routing texts (a prompt, a chat's last user message) get 400 (default: the base "
                        "model's positions)")
    add_body_limit_argument(p)
    p.set_defaults(run=_route)

    p = subparsers.add_parser("export-vllm", help="copy a run's adapters for vLLM and print the vllm serve command")
    p.add_argument("run_dir", help="RUN_DIR (or RUN_DIR/switchcit) of a finished run")
    p.add_argument("out_dir", help="where the adapters go (OUT_DIR/adapters/<task>/)")
    p.add_argument("--served-model-name", default=UPSTREAM_BASE_MODEL,
                   help=f"the base model's name in vLLM (default {UPSTREAM_BASE_MODEL!r})")
    p.set_defaults(run=_export_vllm)


def _route(args: argparse.Namespace) -> None:
    from switchcit.runs import read_run
    from switchcit.switch import Switch

    run = read_run(args.run_dir)
    if run.switch is None:
        raise SystemExit(f"{args.run_dir} has no switch: the gateway has nothing to route with")
    switch = Switch.load(run.switch, encoder=run.base)  # features from the base model, as in `serve`
    app = create_gateway(switch, list(run.adapters), args.upstream.rstrip("/"),
                         upstream_base_model=args.upstream_base_model, max_batch_size=args.max_batch_size,
                         batch_window_ms=args.batch_window_ms, max_queue=args.max_queue, timeout_s=args.timeout,
                         max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes)
    make_server(app, args.host, args.port).run()


def _export_vllm(args: argparse.Namespace) -> None:
    command = shlex.join(export_vllm(args.run_dir, args.out_dir, args.served_model_name))
    script = Path(args.out_dir) / "vllm_serve.sh"
    script.write_text(f"#!/bin/sh\nexec {command}\n")
    script.chmod(0o755)
    print(command)
    print(f"# then: switchcit route --upstream http://127.0.0.1:8000 {shlex.quote(str(args.run_dir))} "
          f"--upstream-base-model {shlex.quote(args.served_model_name)}")
