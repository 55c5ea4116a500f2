"""Typed request bodies of the OpenAI API (pydantic, as FastAPI and vLLM's ``protocol.py`` use them):
the fields, defaults and ranges OpenAI documents, ``top_k`` as vLLM adds it. Unknown fields and
options this server does not implement get a 400 naming the field (their neutral values excepted), so
nothing a client asks for is ignored silently."""
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from switchcit.serving.openai import AUTO, CHAT_ROLES, ApiError, quote

__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "OpenAIRequest", "StreamOptions",
           "parse_request"]

MAX_CHOICES = 16  # n: choices per prompt
MAX_STOP_STRINGS = 4  # OpenAI's limit
UNION_TAGS = ("str", "int", "float", "bool")

# Fields OpenAI defines that this server does not implement: accepted only at their neutral value, so a
# client that sends the default is served and one that asks for the feature gets a 400 naming it.
NEUTRAL_VALUES = {"presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (None, False),
                  "top_logprobs": (None,), "echo": (False,), "best_of": (None, 1), "suffix": (None,),
                  "logit_bias": (None, {}), "user": None}  # None: any value (metadata the server has no use for)


def _openai_fields(payload: dict) -> dict:
    """``payload`` without the fields that ask for nothing: neutral values of unimplemented options."""
    if not isinstance(payload, dict):
        return payload
    return {k: v for k, v in payload.items()
            if not (k in NEUTRAL_VALUES and (NEUTRAL_VALUES[k] is None or v in NEUTRAL_VALUES[k]))}


class _Body(BaseModel):
    # strict: no "1" for 1 or true for 1; forbid: an option this server does not implement is refused, not ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal[CHAT_ROLES]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class _GenerationRequest(_Body):
    """The options both endpoints share (OpenAI's names, defaults and ranges; ``top_k`` as vLLM's)."""

    model: str = AUTO
    max_tokens: int | None = Field(None, ge=1)  # None: the endpoint's default
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)  # -1 or 0: all tokens
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings")
        return stop

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions``: ``prompt`` is a string or a list of strings (one choice per prompt × n)."""

    prompt: str | list[str] = Field(min_length=1)
    chat: ClassVar[bool] = False

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions``: ``messages`` with at least one user message."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    chat: ClassVar[bool] = True

    @field_validator("messages")
    @classmethod
    def _one_user_message(cls, messages):
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages need at least one user message")
        return messages

    @model_validator(mode="after")
    def _one_token_limit(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ: give one")
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def routing_text(self) -> str:
        """What the switch reads: the last user message."""
        return [m.text for m in self.messages if m.role == "user"][-1]

    @property
    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text} for m in self.messages]


OpenAIRequest = CompletionRequest | ChatCompletionRequest


def parse_request(payload: Any, chat: bool) -> OpenAIRequest:
    """A typed request from a JSON body (400 naming the first field that is wrong, unknown or unsupported)."""
    kind = ChatCompletionRequest if chat else CompletionRequest
    if not isinstance(payload, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return kind.model_validate(_openai_fields(payload))
    except ValidationError as error:
        problem = error.errors(include_url=False)[0]
        # the loc names the union member that failed ("prompt.str"): the client needs the field only
        param = ".".join(str(p) for p in problem["loc"] if not isinstance(p, str) or p.isidentifier()
                         and p not in UNION_TAGS) or None
        if problem["type"] == "extra_forbidden":
            message = f"{param} is not supported by this server"
        elif problem["type"] == "missing":
            message = f"{param} is required"
        else:
            message = f"{param + ': ' if param else ''}{problem['msg']} (got {quote(problem.get('input'))})"
        raise ApiError(400, message, param=param) from None
