"""The OpenAI wire format: request bodies, error bodies, responses and stream chunks.

Pure data and functions, no model and no HTTP: the server parses requests with these models
and builds every answer with these helpers.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ..api.spec import MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, GenerationSpec, check_temperature
from .sampling import SamplingParams


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


INT64_MAX = 2**63 - 1
Temperature = Annotated[float, Field(ge=0.0, le=2.0), AfterValidator(check_temperature)]
# One stop string or a list of up to 16; always a list once parsed.
Stops = Annotated[Union[Annotated[list[str], Field(max_length=16)], str], AfterValidator(lambda v: [v] if isinstance(v, str) else v)]
# JSON types exactly as the published OpenAPI document says (no "5" for 5, no "true" for
# true), so a request the document forbids is never accepted.
_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class _Request(BaseModel):
    # Unknown fields (user, metadata, ...) are ignored as most OpenAI-compatible servers do.
    # Every number is finite and bounded here, before any of it reaches the model: one
    # request's settings must never break the arithmetic of a batch it shares.
    model_config = _STRICT

    model: str
    max_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)
    temperature: Optional[Temperature] = Field(None, description="0 = greedy, else 0.01 to 2.")
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: Stops = Field(default_factory=list, description="Text that ends the answer (not part of it): a string or up to 16.")
    # torch's generator takes any 64-bit seed, signed or not.
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Not supported: must be 0.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Not supported: must be 0.")
    logprobs: Optional[Union[bool, int]] = Field(None, description="Not supported.")
    # Extra fields beyond the OpenAI API (as vLLM accepts them).
    top_k: Optional[int] = Field(None, ge=-1, le=INT64_MAX, description="-1 or 0 = all tokens.")
    repetition_penalty: Optional[float] = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    no_repeat_ngram_size: Optional[int] = Field(None, ge=0, le=INT64_MAX)
    num_beams: Optional[int] = Field(None, ge=1, le=64)
    ignore_eos: bool = False

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server; use repetition_penalty", param=name)
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def sampling_params(self, defaults: GenerationSpec, prompt_tokens: int, context: int) -> SamplingParams:
        """This request's settings over the server's defaults, bounded by the context."""
        room = context - prompt_tokens
        requested = self.requested_max_tokens()
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, {requested} for the completion). "
                "Please reduce the prompt or max_tokens.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if self.temperature is not None:
            temperature = self.temperature
        else:
            temperature = defaults.temperature if defaults.do_sample is not False else 0.0
        top_k = self.top_k if self.top_k is not None else defaults.top_k
        return SamplingParams(
            max_tokens=requested if requested is not None else min(defaults.max_tokens, room),
            temperature=temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            top_k=max(top_k, 0),
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else defaults.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size if self.no_repeat_ngram_size is not None else defaults.no_repeat_ngram_size,
            num_beams=self.num_beams if self.num_beams is not None else defaults.num_beams,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Required: without tool calls (not supported) a message without content means nothing.
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=INT64_MAX)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self, history: bool) -> list[dict[str, str]]:
        """Messages for the chat template; without history only system prompts and the last user turn."""
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        if history:
            return messages
        last_user = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not last_user:
            raise APIError(400, "messages must contain a user message", param="messages")
        return [m for i, m in enumerate(messages) if m["role"] == "system" or i == last_user[-1]]


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False

    def prompts(self) -> list[Union[str, list[int]]]:
        """One entry per prompt: text or token ids."""
        if self.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if not value:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(v, int) for v in value):
            return [list(value)]  # type: ignore[list-item]
        return list(value)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# answers: the JSON bodies are built through these models, which the OpenAPI document
# publishes; stream chunks are plain dicts (built per token, so kept cheap) that the chunk
# models describe (tests/serve/test_openapi.py checks every streamed event against them).

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _Envelope(BaseModel):
    """What every answer and stream chunk carries."""

    id: str
    created: int
    model: str


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Optional[FinishReason]
    logprobs: None = None


class ChatCompletionChunk(_Envelope):
    """One server-sent event of a streamed chat answer (`chat_chunk`, `usage_chunk` build them)."""

    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    finish_reason: Optional[FinishReason]
    logprobs: None = None


class CompletionChunk(_Envelope):
    """One server-sent event of streamed completions (`completion_chunk`, `usage_chunk` build them)."""

    object: Literal["text_completion"]
    choices: list[CompletionChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Status(BaseModel):
    """What the probes answer."""

    status: Literal["ok", "ready", "loading"]
    model: Optional[str] = None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def chat_response(rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return ChatCompletion(
        id=rid, created=int(time.time()), model=model, usage=usage(prompt_tokens, completion_tokens),
        choices=[ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason) for i, (text, reason) in enumerate(choices)],
    ).model_dump()  # fmt: skip


def completion_response(rid: str, model: str, choices: list[tuple[str, str]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return Completion(
        id=rid, created=int(time.time()), model=model, usage=usage(prompt_tokens, completion_tokens),
        choices=[CompletionChoice(index=i, text=text, finish_reason=reason) for i, (text, reason) in enumerate(choices)],
    ).model_dump()  # fmt: skip


def chat_chunk(rid: str, model: str, index: int, delta: dict[str, str], finish_reason: Optional[str] = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def completion_chunk(rid: str, model: str, index: int, text: str, finish_reason: Optional[str] = None) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(rid: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens).model_dump()}


def sse(data: Union[dict[str, Any], str]) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "TextPart", "ChatMessage"}


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first pydantic validation error of a request body as an OpenAI-style 400."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "model_type" or not first.get("loc"):
        return APIError(400, "The request body must be a JSON object")
    # Union branches add their type names to loc; keep field names and indices only.
    loc = [str(p) for p in first["loc"]]
    param = ".".join(p for p in loc if (p.isidentifier() and p not in _TYPE_NAMES) or p.isdigit()) or None
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "field required"
    return APIError(400, f"{param}: {message}" if param else message, param=param)
