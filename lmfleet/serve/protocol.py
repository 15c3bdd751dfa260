"""The OpenAI wire format: request bodies (validated by pydantic) and response builders.

Requests accept the OpenAI fields lmfleet implements plus vLLM's sampling extras (`top_k`, `min_p`,
`repetition_penalty`, `priority`, `ignore_eos`, `stop_token_ids`, `skip_special_tokens`).
Fields lmfleet does not implement are rejected by name rather than silently ignored when they
would change the answer (`echo`, `suffix`, `best_of`, `tools`, `response_format`);
unknown fields are ignored, as the OpenAI API does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lmfleet.engine import SamplingParams
from lmfleet.engine.engine import CompletionOutput
from lmfleet.engine.params import MAX_LOGIT_BIAS_ENTRIES, MAX_LOGPROBS


class UnsupportedField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    priority: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def _check_common(self) -> None:
        if self.temperature is not None and not 0 <= self.temperature <= 2:  # the OpenAI API's range
            raise UnsupportedField("temperature", f"temperature={self.temperature} must be in [0, 2]")
        if self.logit_bias is not None and len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise UnsupportedField("logit_bias", f"logit_bias has {len(self.logit_bias)} entries; at most "
                                                 f"{MAX_LOGIT_BIAS_ENTRIES} are allowed")
        for key in self.logit_bias or {}:
            if not (key.isascii() and key.isdigit()):
                raise UnsupportedField("logit_bias", f"logit_bias keys are token ids; {key[:40]!r} is not one")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options is only allowed with stream=true")

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ValueError (ConfigError) naming the field when a value is out of range."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty, seed=self.seed,
            stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, n=self.n,
            logprobs=logprobs, priority=self.priority, skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()})


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        self._check_common()
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise UnsupportedField("best_of", "best_of different from n is not supported")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise UnsupportedField("prompt", "prompt is empty")
        if isinstance(p[0], int):
            return [list(p)]  # one prompt of token ids
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True

    def check(self) -> None:
        self._check_common()
        if self.tools:
            raise UnsupportedField("tools", "tools (function calling) are not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise UnsupportedField("response_format", "only response_format {\"type\": \"text\"} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedField("top_logprobs", "top_logprobs needs logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise UnsupportedField("top_logprobs", f"top_logprobs={self.top_logprobs} must be in [0, {MAX_LOGPROBS}]")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise UnsupportedField("prompt", "give exactly one of prompt or messages")


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    """Every error answer: OpenAI's shape."""
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error statuses a route can answer (all in ErrorResponse's shape)."""
    reasons = {400: "a field is invalid (param names it)", 401: "missing or invalid API key",
               404: "unknown model or route", 413: "body over --max-body-bytes",
               429: "queue full or rate limit (Retry-After)", 500: "the engine failed this request",
               503: "loading, shutting down or engine dead"}
    return {status: {"model": ErrorResponse, "description": reasons[status]} for status in statuses}


# One server-sent event: a JSON chunk (or an error object) in `data`, or the closing `[DONE]`.
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
              "required": ["data"]}


def generation_responses() -> dict[int | str, dict[str, Any]]:
    """A generation route: JSON, or server-sent events with stream=true; and its errors."""
    return {200: {"description": "the completion, or its stream with stream=true",
                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}},
            **error_responses(400, 401, 404, 413, 429, 500, 503)}


# ---- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache."""
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def chat_logprobs(entries: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any]:
    """The engine's per-token logprobs in the chat format: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(e["token_id"], e["logprob"]),
                         "top_logprobs": [item(t, lp) for t, lp in e.get("top", [])]} for e in entries]}


def completion_logprobs(entries: list[dict[str, Any]], tokenizer: Any, offset: int = 0) -> dict[str, Any]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for e in entries:
        text = _token_text(tokenizer, e["token_id"])
        tokens.append(text)
        token_logprobs.append(e["logprob"])
        tops.append({_token_text(tokenizer, t): lp for t, lp in e.get("top", [])})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def finish_reason(output: CompletionOutput) -> str | None:
    """The engine's reason as sent: stop, length, abort (as vLLM; never passed off as stop), error."""
    return output.finish_reason


def envelope(kind: str, request_id: str, model: str, choices: list[dict[str, Any]],
             usage_: dict[str, Any] | None = None, created: int | None = None,
             null_usage: bool = False) -> dict[str, Any]:
    """A response or stream chunk; `null_usage`: carry `"usage": null` (streams that will end with
    a usage chunk carry it on every chunk)."""
    body = {"id": request_id, "object": kind, "created": created or int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None or null_usage:
        body["usage"] = usage_
    return body
