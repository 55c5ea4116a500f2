"""What the serving, gateway and training tests share: the session's tiny run (built once) and a stub
OpenAI upstream; the run builder and the loopback server are :mod:`switchcit.testing`'s."""
from __future__ import annotations

from pathlib import Path

from switchcit.testing import (  # noqa: F401 (re-exported for the tests)
    TASKS,
    TOPICS,
    TRAINED_TOPICS,
    build_run,
    serving,
    task_prompts,
    tiny_llama_base,
)


def tiny_run(tmp_path_factory) -> Path:
    """The tiny run of this test session, built once (the switch's training is the slow part)."""
    import pytest

    root = tmp_path_factory.getbasetemp() / "tiny-switchcit-run"
    if not (root / "run" / "switchcit" / "run.json").is_file():
        try:
            build_run(root)
        except ImportError as err:  # no SmolLM2 tokenizer
            pytest.skip(str(err))
    return root / "run"


def stub_upstream(received: list):
    """An OpenAI-compatible stub (a plain Starlette app): records each body; answers with the model it
    was asked for, or with a 400 error when max_tokens is 999 (as vLLM does for a limit it refuses);
    ``GET /health`` answers 200 with no body, as vLLM's does."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def answer(request):
        payload = await request.json()
        received.append((request.url.path, payload))
        if payload.get("max_tokens") == 999:
            error = {"message": "max_tokens is too large", "type": "BadRequestError", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        return JSONResponse({
            "id": "cmpl-stub", "object": "text_completion", "model": payload["model"],
            "choices": [{"index": 0, "text": f"written by {payload['model']}", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def health(request):
        return Response()

    paths = ("/v1/completions", "/v1/chat/completions")
    return Starlette(routes=[*[Route(path, answer, methods=["POST"]) for path in paths], Route("/health", health)])
