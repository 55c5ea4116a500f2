"""The OpenAI API edge shared by ``switchcit serve`` and ``switchcit route``: request checks, the
model names (``auto``: the switch picks; ``base``: no adapter — the only place that name exists),
error responses in OpenAI's shape, ``/v1/models`` and ``/health`` bodies."""
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from switchcit.prompts import is_text

if TYPE_CHECKING:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

__all__ = ["AUTO", "BASE_MODEL_NAME", "CHAT_ROLES", "MAX_BODY_BYTES", "ApiError", "check_model", "health_response",
           "install_error_handlers", "models_response", "quote", "read_json"]

AUTO = "auto"  # model name: let the switch pick the adapter
BASE_MODEL_NAME = "base"  # model name: no adapter (id −1 inside the library)
CHAT_ROLES = ("system", "user", "assistant")
MAX_BODY_BYTES = 1 << 20  # default body limit: a prompt of --max-prompt-tokens is a few kB
MAX_JSON_DEPTH = 32  # OpenAI bodies nest a few levels; the gateway's encoder must manage what the parser took
QUOTE_CHARS = 40  # errors quote at most this much of what they reject


def quote(value: Any) -> str:
    """``value`` as JSON, cut to a short prefix: an error never echoes a whole request back."""
    text = json.dumps(value)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"


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


def check_model(model: str, adapters: Sequence[str], has_switch: bool) -> None:
    """``model`` must be ``auto`` (with a switch), ``base`` or an adapter."""
    if model not in (AUTO, BASE_MODEL_NAME, *adapters):
        raise ApiError(404, f"unknown model {quote(model)}: use {AUTO!r}, {BASE_MODEL_NAME!r} or an adapter "
                            f"{list(adapters)}", param="model", code="model_not_found")
    if model == AUTO and not has_switch:
        raise ApiError(400, f"this run has no switch: name an adapter {list(adapters)} or {BASE_MODEL_NAME!r}",
                       param="model")


async def read_json(request: "Request", max_body_bytes: int = MAX_BODY_BYTES) -> Any:
    """The body as JSON, read only up to ``max_body_bytes`` (413 beyond). 400 for anything the
    tokenizer could not read or the gateway could not forward: NaN or infinite numbers, lone
    surrogates, nesting deeper than ``MAX_JSON_DEPTH``, in any field."""
    too_large = ApiError(413, f"the request body is over {max_body_bytes} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large  # before reading a byte of it
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body declares no length
        size += len(chunk)
        if size > max_body_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        payload = json.loads(b"".join(chunks), parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, bytes that are no text, an integer of too many digits
        raise ApiError(400, f"malformed JSON body: {str(error)[:200]}") from None
    _check_values(payload)
    return payload


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:QUOTE_CHARS]} is out of range")
    return value


def _check_values(payload: Any) -> None:
    """400 for nesting deeper than ``MAX_JSON_DEPTH`` or a string (key or value) that is no Unicode:
    JSON's escapes can spell lone surrogates, which no encoder takes. Iterative: no depth is too deep
    for the check itself."""
    todo = [(payload, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            todo += [(item, depth + 1) for item in items]
        elif isinstance(value, str) and not is_text(value):
            raise ApiError(400, f"the body holds a string that is no valid Unicode (a lone surrogate): {quote(value)}")



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
        message = f"internal error: {type(error).__name__}: {str(error)[:200]}"  # the traceback goes to the log
        return ApiError(500, message, kind="server_error").response()


def models_response(adapters: Sequence[str], has_switch: bool, created: int) -> dict:
    names = ([AUTO] if has_switch else []) + [BASE_MODEL_NAME, *adapters]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "switchcit"}
                                       for n in names]}


def health_response(batcher) -> "JSONResponse":
    from fastapi.responses import JSONResponse

    status = {"status": "ok" if batcher.accepting else "shutting_down", "queued": batcher.queued,
              "in_batch": batcher.in_batch}
    return JSONResponse(status, status_code=200 if batcher.accepting else 503)
