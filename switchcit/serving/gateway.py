"""Scale-out: the switch in front of a multi-LoRA server such as vLLM.

``switchcit route --upstream URL RUN_DIR``: an OpenAI-compatible gateway that runs only the switch —
the base model's embeddings and decoder layers below the switch layer K, loaded alone from the
checkpoint (:func:`load_routing_switch`), in a pass that stops at layer K; no generation — and forwards
each request to ``URL`` with ``model`` set to the prompt's adapter, or to the upstream's name for the
base model; every choice of the answer gets ``"adapter"``. Model names (``auto``, ``base``, the
adapters) are those of ``switchcit serve``, and so are the checks of the fields both know
(:func:`switchcit.serving.protocol.parse_request`); other fields (vLLM's own options…) go to the
upstream as sent, and its answer, errors included, comes back with its status. ``stream: true``
answers pass through event by event as the upstream sends them, each chunk's choices with
``"adapter"``. Requests for ``auto`` that arrive together are routed in one batch, each checked
before it joins one (its routing text tokenised as the switch reads it, at most
``--max-prompt-tokens``); a batch that still fails is routed again prompt by prompt, so only a
faulty request gets its error. A completion with several prompts is forwarded whole, so with
``auto`` they must all route to one adapter (else 400).

Upstream faults, in OpenAI's error shape: a refused connection or an answer that breaks off → 502;
no connection within ``--connect-timeout`` (5 s), no whole answer within ``--timeout`` (600 s) or a
stream silent for ``--stream-timeout`` (60 s) → 504; a stream that fails after it started ends with
an error event and ``data: [DONE]``. ``/health`` is 503 with the reason while the upstream's
``/health`` (``/v1/models`` where it has none) does not answer.

``switchcit export-vllm RUN_DIR OUT_DIR``: copies the run's adapters to ``OUT_DIR/adapters/<task>/``
(PEFT folders, as vLLM loads them) and prints — and writes to ``OUT_DIR/vllm_serve.sh`` — the
``vllm serve`` command that serves the base model (in its own dtype: vLLM would pick bfloat16 on a
CPU) and every adapter in mixed batches on 127.0.0.1, followed by the matching ``switchcit route``
command.
"""
import argparse
import asyncio
import copy
import json
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from switchcit.prompts import prompt_tokens
from switchcit.serving.app import add_body_limit_argument, add_listen_arguments, add_model_arguments, make_server
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
    read_json,
)
from switchcit.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request

if TYPE_CHECKING:
    import httpx
    import torch
    from fastapi import FastAPI
    from fastapi.responses import Response

    from switchcit.switch import Switch

__all__ = ["add_command", "base_dtype", "create_gateway", "export_vllm", "load_encoder_until", "load_routing_switch",
           "route_command", "vllm_max_lora_rank"]

# The values vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
UPSTREAM_BASE_MODEL = "base"  # the base model's name upstream: the exported command serves it under this name
VLLM_HOST, VLLM_PORT = "127.0.0.1", 8000  # where the exported command serves, and the route command looks
CONNECT_TIMEOUT_S = 5.0  # an upstream that is up accepts at once; also the limit of the health probe
STREAM_TIMEOUT_S = 60.0  # the longest silence within a stream: vLLM sends a chunk per token
ANSWER_TIMEOUT_S = 600.0  # a whole non-streamed answer: a long generation under load
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def create_gateway(switch: "Switch", adapters: Sequence[str], upstream: str, *,
                   upstream_base_model: str = UPSTREAM_BASE_MODEL, max_batch_size: int = 32,
                   batch_window_ms: float = 5.0, max_queue: int = 1024, timeout_s: float = ANSWER_TIMEOUT_S,
                   stream_timeout_s: float = STREAM_TIMEOUT_S, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                   drain_timeout_s: float = 30.0, max_prompt_tokens: int | None = None,
                   max_body_bytes: int = MAX_BODY_BYTES) -> "FastAPI":
    """The gateway app: ``switch.route(prompts)`` (with its encoder) picks a task, or ``None`` when
    unsure, per prompt; tasks without an adapter go to the base model. ``max_prompt_tokens``: the
    longest routing text the switch reads (default: the base model's positions). ``timeout_s``: the
    longest wait for a whole answer, ``stream_timeout_s``: for a stream's next chunk (its first
    included), ``connect_timeout_s``: for the upstream to accept a connection or answer ``/health``.
    Run it with :func:`switchcit.serving.app.make_server`."""
    import httpx
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    _check_upstream(upstream, timeout_s, stream_timeout_s, connect_timeout_s)
    adapters = list(adapters)
    max_prompt_tokens = max_prompt_tokens or getattr(switch.encoder.config, "max_position_embeddings", None)
    tokenizer = copy.deepcopy(switch.tokenizer)  # requests tokenise on other threads than the switch's (see app.py)

    def check_routing_texts(texts: list[str], param: str) -> None:
        """What the switch will read, tokenised as it does: no longer than ``max_prompt_tokens``."""
        for text in texts:
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
        async with httpx.AsyncClient(base_url=upstream,
                                     timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s)) as client:
            app.state.client = client
            batcher.start()
            yield
            await batcher.close()

    app = FastAPI(title="switchcit gateway", lifespan=lifespan)
    app.state.batcher = batcher
    install_error_handlers(app)

    def upstream_failure(error: "httpx.HTTPError") -> ApiError:
        """The gateway's answer to a request the upstream did not answer (whole)."""
        if isinstance(error, httpx.ConnectTimeout):
            message, status = f"the upstream {upstream} did not accept a connection within {connect_timeout_s} s", 504
        elif isinstance(error, httpx.TimeoutException):
            waited = error.request.extensions["timeout"]["read"]
            message, status = f"the upstream {upstream} sent nothing for {waited} s", 504
        else:  # down, or gone in the middle of its answer
            message, status = f"the upstream {upstream} failed: {type(error).__name__}: {str(error)[:200]}", 502
        return ApiError(status, message, code="upstream_timeout" if status == 504 else "upstream_unavailable",
                        kind="upstream_error")

    async def route(body: CompletionRequest | ChatCompletionRequest) -> str:
        """The adapter (or ``base``) the request goes to."""
        if body.model != AUTO:
            return body.model
        texts, param = ([body.routing_text], "messages") if body.chat else (body.prompts, "prompt")
        await asyncio.to_thread(check_routing_texts, texts, param)
        routed = list(dict.fromkeys(await asyncio.gather(*(batcher.submit(text) for text in texts))))
        if len(routed) > 1:  # one upstream request has one model
            raise ApiError(400, f"the prompts of this request go to different adapters {routed}: send them in "
                                f"separate requests, or name the model", param="prompt")
        return routed[0]

    async def forward(request: Request, path: str, chat: bool) -> "Response":
        payload = await read_json(request, max_body_bytes)
        body = parse_request(_known_fields(payload, chat), chat)
        check_model(body.model, adapters, has_switch=True)
        adapter = await route(body)
        upstream_model = upstream_base_model if adapter == BASE_MODEL_NAME else adapter
        client: httpx.AsyncClient = request.app.state.client
        sent = client.build_request("POST", path, json=payload | {"model": upstream_model},
                                    timeout=httpx.Timeout(stream_timeout_s if body.stream else timeout_s,
                                                          connect=connect_timeout_s))
        try:
            response = await client.send(sent, stream=True)
        except httpx.HTTPError as error:
            raise upstream_failure(error) from None
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(relay_events(response, adapter), status_code=response.status_code,
                                     media_type="text/event-stream")
        try:
            content = await response.aread()
        except httpx.HTTPError as error:
            raise upstream_failure(error) from None
        finally:
            await response.aclose()
        try:
            answer = json.loads(content)
        except ValueError:
            raise ApiError(502, f"the upstream answered {response.status_code} without JSON",
                           kind="upstream_error") from None
        if response.is_success:
            _mark_choices(answer, adapter)
        return JSONResponse(answer, status_code=response.status_code)

    async def relay_events(response: "httpx.Response", adapter: str) -> AsyncIterator[str]:
        """The upstream's server-sent events, each passed on as soon as it is complete."""
        event: list[str] = []
        try:
            async for line in response.aiter_lines():
                if line:
                    event.append(line)
                elif event:
                    yield _event_with_adapter(event, adapter)
                    event = []
            if event:
                yield _event_with_adapter(event, adapter)
        except httpx.HTTPError as error:  # the stream has started: its status is sent, the end says what failed
            yield f"data: {upstream_failure(error).response().body.decode()}\n\ndata: [DONE]\n\n"
        finally:
            await response.aclose()  # also when the client leaves: the upstream stops generating

    async def upstream_problem() -> str | None:
        """Why the upstream is not serving, or ``None``: its ``/health`` (``/v1/models`` where it has
        none) must answer 2xx within ``connect_timeout_s``."""
        client: httpx.AsyncClient = app.state.client
        try:
            probe = await client.get("/health", timeout=connect_timeout_s)
            if probe.status_code == 404:
                probe = await client.get("/v1/models", timeout=connect_timeout_s)
        except httpx.HTTPError as error:
            return f"the upstream {upstream} does not answer: {type(error).__name__}: {str(error)[:200]}"
        if not probe.is_success:
            return f"the upstream {upstream} answered {probe.status_code} to {probe.request.url.path}"
        return None

    @app.post("/v1/completions")
    async def completions(request: Request) -> "Response":
        return await forward(request, "/v1/completions", chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> "Response":
        return await forward(request, "/v1/chat/completions", chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return models_response(adapters, True, created)

    @app.get("/health")
    async def health() -> JSONResponse:
        answer = health_response(batcher)
        if answer.status_code != 200:
            return answer
        problem = await upstream_problem()
        if problem is None:
            return answer
        return JSONResponse({"status": "upstream_unavailable", "reason": problem}, status_code=503)

    return app


def _check_upstream(upstream: str, *timeouts_s: float) -> None:
    """An http(s) URL and positive timeouts (before the switch is loaded, when from the command line)."""
    if not upstream.startswith(("http://", "https://")):
        raise ValueError(f"the upstream must be an http:// or https:// URL, got {upstream!r}")
    if not all(timeout > 0 for timeout in timeouts_s):
        raise ValueError(f"the upstream's timeouts must be positive, got {list(timeouts_s)}")


def _known_fields(payload: Any, chat: bool) -> Any:
    """The fields of ``payload`` this server's protocol defines (checked as ``serve`` checks them); the
    upstream judges the others (vLLM has options of its own)."""
    if not isinstance(payload, dict):
        return payload  # parse_request refuses it
    known = (ChatCompletionRequest if chat else CompletionRequest).model_fields
    return {name: value for name, value in payload.items() if name in known}


def _mark_choices(answer: Any, adapter: str) -> None:
    """Every choice of an upstream answer (or stream chunk) says which adapter wrote it."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        if isinstance(choice, dict):
            choice["adapter"] = adapter


def _event_with_adapter(lines: list[str], adapter: str) -> str:
    """One server-sent event (its lines) as sent on: JSON ``data`` with ``"adapter"`` on its choices."""
    sent = []
    for line in lines:
        field, _, value = line.partition(":")
        if field == "data" and value.strip() != "[DONE]":
            try:
                chunk = json.loads(value)
            except ValueError:
                chunk = None  # not JSON: passed on as it came
            if isinstance(chunk, dict):
                _mark_choices(chunk, adapter)
                line = f"data: {json.dumps(chunk)}"
        sent.append(line)
    return "\n".join(sent) + "\n\n"


# --------------------------------------------------------------------------------------------------
# The switch's encoder: only the layers it reads


def _checkpoint(base: str | Path) -> tuple[Any, dict[str, str]]:
    """The base model's config and ``{weight name: safetensors file}`` (a folder or a hub id; one
    file or shards)."""
    from transformers import AutoConfig
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(base)
    index = cached_file(base, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index is not None:
        shards = json.loads(Path(index).read_text())["weight_map"]
        files = {shard: cached_file(base, shard) for shard in set(shards.values())}
        return config, {name: files[shard] for name, shard in shards.items()}
    from safetensors import safe_open

    single = cached_file(base, "model.safetensors")
    with safe_open(single, framework="pt") as weights:
        return config, dict.fromkeys(weights.keys(), single)


def base_dtype(base: str | Path) -> str:
    """The dtype ``from_pretrained`` gives the base model by default (``"auto"``): its config's, or
    that of its stored weights — what ``switchcit serve`` computes in, e.g. ``"float32"``."""
    return _stored_dtype(*_checkpoint(base))


def _stored_dtype(config: Any, weight_files: dict[str, str]) -> str:
    from safetensors import safe_open

    if config.dtype is not None:
        return str(config.dtype).removeprefix("torch.")
    name, file = next(iter(weight_files.items()))
    with safe_open(file, framework="pt") as weights:
        return SAFETENSORS_DTYPES[weights.get_slice(name).get_dtype()]


def load_encoder_until(base: str | Path, layer: int, device: str = "cpu",
                       dtype: str | None = None) -> tuple["torch.nn.Module", Any]:
    """``(encoder, tokenizer)`` for a switch at ``layer`` = K: the base model (no LM head) with only
    its embeddings, decoder layers 0…K−1 and final norm, read alone from the checkpoint's safetensors.
    Layers K…L−1 are appended on the meta device (no memory, never run: the switch's pass stops as
    layer K starts, :func:`switchcit.switch.encode_layers`), so the config still describes the whole
    base model, as the switch checks. Features are those of the whole model, in the same dtype (or
    ``dtype``), on ``device``."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModel, AutoTokenizer
    from transformers.initialization import no_init_weights

    from switchcit.switch import check_layer, decoder_layers

    config, weight_files = _checkpoint(base)
    check_layer(layer, config)
    dtype = getattr(torch, dtype or _stored_dtype(config, weight_files))
    with torch.device("meta"):
        whole = AutoModel.from_config(config, dtype=dtype)  # for the layer list's path and layers K…L−1
    layers_path = next(name for name, module in whole.named_modules() if module is decoder_layers(whole))
    below = copy.deepcopy(config)
    below.num_hidden_layers = layer
    with no_init_weights():  # every weight is read from the checkpoint
        encoder = AutoModel.from_config(below, dtype=dtype)
    prefix, wanted = encoder.base_model_prefix, {}
    for name in encoder.state_dict():
        stored = next((key for key in (name, f"{prefix}.{name}") if key in weight_files), None)
        if stored is None:
            raise ValueError(f"{base} has no weight {name!r} (nor {prefix}.{name}) in its safetensors")
        wanted.setdefault(weight_files[stored], []).append((name, stored))
    state = {}
    for file, names in wanted.items():
        with safe_open(file, framework="pt") as weights:
            state.update({name: weights.get_tensor(stored) for name, stored in names})
    encoder.load_state_dict(state)
    encoder.to(device)
    encoder.get_submodule(layers_path).extend(whole.get_submodule(layers_path)[layer:])
    encoder.config = config  # the forward walks the whole layer list, up to the early exit
    return encoder.eval(), AutoTokenizer.from_pretrained(base)


def load_routing_switch(run_dir: str | Path, device: str | None = None, dtype: str | None = None) -> "Switch":
    """The run's switch with :func:`load_encoder_until`'s encoder (on ``device``, in ``dtype``; default:
    cuda if available, else cpu; the checkpoint's dtype): what the gateway holds of the base model."""
    import torch

    from switchcit.runs import read_run
    from switchcit.switch import SWITCH_CONFIG, Switch

    run = read_run(run_dir)
    if run.switch is None:
        raise ValueError(f"{run_dir} has no switch: the gateway has nothing to route with")
    if not (run.switch / SWITCH_CONFIG).is_file():
        raise FileNotFoundError(f"{run.switch} is not a saved switch: {SWITCH_CONFIG} is missing")
    layer = json.loads((run.switch / SWITCH_CONFIG).read_text())["layer"]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder, tokenizer = load_encoder_until(run.base, layer, device, dtype)
    return Switch.load(run.switch, encoder=encoder, tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------------
# Export for vLLM


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
    (argv) serving the base model as ``served_model_name`` in its own dtype (:func:`base_dtype`) on
    ``VLLM_HOST:VLLM_PORT``, and every adapter under its task's name, all of them allowed in one batch."""
    from switchcit.runs import read_run

    run = read_run(run_dir)
    adapters_dir = Path(out_dir).resolve() / "adapters"
    for task, folder in run.adapters.items():
        shutil.copytree(folder, adapters_dir / task, dirs_exist_ok=True)
    rank = max(_adapter_rank(folder) for folder in run.adapters.values())
    base = str(Path(run.base).resolve()) if Path(run.base).exists() else run.base  # a folder, or a hub id
    return [
        "vllm", "serve", base, "--served-model-name", served_model_name, "--dtype", base_dtype(run.base),
        "--host", VLLM_HOST, "--port", str(VLLM_PORT), "--enable-lora",
        "--max-loras", str(len(run.adapters)), "--max-lora-rank", str(vllm_max_lora_rank(rank)),
        "--lora-modules", *[f"{task}={adapters_dir / task}" for task in run.adapters],
    ]


def route_command(run_dir: str | Path, served_model_name: str = UPSTREAM_BASE_MODEL) -> list[str]:
    """The ``switchcit route`` command (argv) in front of :func:`export_vllm`'s ``vllm serve``."""
    return ["switchcit", "route", "--upstream", f"http://{VLLM_HOST}:{VLLM_PORT}", str(Path(run_dir).resolve()),
            "--upstream-base-model", served_model_name]


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
    add_model_arguments(p)
    p.add_argument("--max-batch-size", type=int, default=32, help="prompts routed together (default 32)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, help="routing batch window (default 5)")
    p.add_argument("--max-queue", type=int, default=1024, help="prompts waiting beyond this get 429 (default 1024)")
    p.add_argument("--timeout", type=float, default=ANSWER_TIMEOUT_S,
                   help=f"seconds to wait for a whole answer from the upstream (default {ANSWER_TIMEOUT_S:g})")
    p.add_argument("--stream-timeout", type=float, default=STREAM_TIMEOUT_S,
                   help=f"seconds a stream may stay silent, its first chunk included (default {STREAM_TIMEOUT_S:g})")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S,
                   help=f"seconds for the upstream to accept a connection or answer /health (default "
                        f"{CONNECT_TIMEOUT_S:g})")
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
    from switchcit.cli import command_error
    from switchcit.runs import read_run

    try:
        _check_upstream(args.upstream, args.timeout, args.stream_timeout, args.connect_timeout)
        adapters = list(read_run(args.run_dir).adapters)
        app = create_gateway(
            load_routing_switch(args.run_dir, args.device, args.dtype), adapters, args.upstream.rstrip("/"),
            upstream_base_model=args.upstream_base_model,
            max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
            timeout_s=args.timeout, stream_timeout_s=args.stream_timeout, connect_timeout_s=args.connect_timeout,
            max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes)
    except (FileNotFoundError, ValueError) as error:
        command_error("route", error)
    make_server(app, args.host, args.port).run()


def _export_vllm(args: argparse.Namespace) -> None:
    from switchcit.cli import command_error

    try:
        command = shlex.join(export_vllm(args.run_dir, args.out_dir, args.served_model_name))
    except (FileNotFoundError, ValueError) as error:
        command_error("export-vllm", error)
    then = shlex.join(route_command(args.run_dir, args.served_model_name))
    script = Path(args.out_dir) / "vllm_serve.sh"
    script.write_text(f"#!/bin/sh\n# then, beside it: {then}\nexec {command}\n")
    script.chmod(0o755)
    print(command)
    print(f"# then: {then}")
