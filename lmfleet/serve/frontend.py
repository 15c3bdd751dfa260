"""What every protocol front (HTTP in `app`, gRPC in `grpc_server`) shares: settings, the
OpenAI-shaped error, access checks, admission and request start-up over one AsyncLLMEngine.

Failures are `APIError`s carrying an HTTP status; each front maps them to its own codes.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from lmfleet.engine import AsyncLLMEngine
from lmfleet.engine.async_engine import EngineDeadError, RequestStream
from lmfleet.engine.engine import RequestOutput
from lmfleet.serve.auth import KeyChecker, RateLimiter, needs_key, rate_limited
from lmfleet.serve.metrics import ServerMetrics


@dataclass
class ServeSettings:
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queued_requests: int = 512  # requests waiting beyond the running batch before 429
    max_body_bytes: int = 4 * 1024 * 1024
    rate_limit: float | None = None  # requests/s per API key (token bucket)
    rate_burst: int | None = None
    protect_metrics: bool = False  # require the API key for /metrics too
    grpc_port: int | None = None  # also serve the lmfleet.v1 gRPC API on this port
    grpc_host: str = "127.0.0.1"
    ssl_keyfile: str | None = None  # TLS for the gRPC port too, when set
    ssl_certfile: str | None = None
    enable_docs: bool = False  # serve /docs, /redoc and /openapi.json (off: they map the API for anyone)
    enable_priority: bool = False  # honour a request's `priority` (off: any client could preempt the others)


# What one request may start (each prompt runs as `n` sequences): sizes a client controls.
MAX_PROMPTS = 256
MAX_SEQUENCES_PER_REQUEST = 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The OpenAI-shaped error object."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "service_unavailable"}
_FIELD = re.compile(r"^([a-z_]+)(?:=|\s)")


def _param_of(message: str) -> str | None:
    """The request field a validation message starts with ("max_tokens=0 must be ...")."""
    match = _FIELD.match(message)
    return match.group(1) if match else None


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several request streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:  # cancelled or closed early: abort the request
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def check_access(checker: KeyChecker, limiter: RateLimiter | None, authorization: str | None) -> str:
    """The caller's key id; APIError 401 without a valid key (when keys are set), 429 over the rate."""
    key_id = "anonymous"
    if checker.enabled:
        key_id = checker.identify(authorization)
        if key_id is None:
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
    if limiter is not None:
        wait = limiter.acquire(key_id)
        if wait > 0:
            raise APIError(429, "request rate limit reached for this API key", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
    return key_id


class Frontend:
    """What every protocol front (HTTP, gRPC) shares: the engine slot, keys, limits, admission
    and request start-up. Failures are APIErrors; each front maps them to its own status codes."""

    def __init__(self, engine: AsyncLLMEngine | None, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.draining = False
        self.load_error: BaseException | None = None
        self.checker = KeyChecker(settings.api_keys)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
        self.metrics = ServerMetrics(self.status, settings.model_name)

    def status(self) -> dict[str, Any]:
        if self.engine is None:
            return {k: 0 for k in ("running", "waiting", "kv_cache_usage", "prefix_queries", "prefix_hits",
                                   "preemptions", "prompt_tokens", "generation_tokens")}
        return self.engine.status()

    def authorize(self, authorization: str | None, path: str = "/v1/") -> str:
        """The caller's key id for a request to `path` (the access rules of `auth.needs_key`)."""
        if not needs_key(path, self.settings.protect_metrics):
            return "anonymous"
        return check_access(self.checker, self.limiter if rate_limited(path) else None, authorization)

    def ready_engine(self) -> AsyncLLMEngine:
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.engine is None:
            raise APIError(503, "the model is still loading" if self.load_error is None else
                           f"the model failed to load: {self.load_error}", code="not_ready")
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_dead")
        return self.engine

    def admit(self, model: str | None) -> AsyncLLMEngine:
        """The engine, if a request may start now: the right model, engine ready, queue not full."""
        if model is not None and model != self.settings.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.settings.model_name!r}",
                           param="model", code="model_not_found")
        e = self.ready_engine()
        waiting = e.num_unfinished - e.engine.scheduler.max_num_seqs
        if waiting >= self.settings.max_queued_requests:
            raise APIError(429, f"the request queue is full ({self.settings.max_queued_requests} waiting)",
                           code="queue_full", headers={"Retry-After": "1"})
        return e

    async def start(self, e: AsyncLLMEngine, prompts: list[Any],
                    make_params: Callable[[list[int]], Any]) -> list[RequestStream]:
        """Tokenize (on a worker thread: a 4 MiB prompt must not stall the event loop), validate and
        queue every prompt (all or none); 400 names the bad field."""
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"prompt holds {len(prompts)} prompts; at most {MAX_PROMPTS} are allowed per request",
                           param="prompt")
        streams: list[RequestStream] = []
        try:
            all_ids = await asyncio.to_thread(lambda: [e.engine.tokenize(p) for p in prompts])
            for ids in all_ids:
                params = make_params(ids)
                if params.priority and not self.settings.enable_priority:
                    raise APIError(400, "priority is not enabled on this server (lmfleet serve --enable-priority)",
                                   param="priority")
                if len(prompts) * params.n > MAX_SEQUENCES_PER_REQUEST:
                    raise APIError(400, f"{len(prompts)} prompts x n={params.n} is more than "
                                        f"{MAX_SEQUENCES_PER_REQUEST} sequences in one request", param="n")
                streams.append(e.add_request(ids, params))
        except APIError:
            for s in streams:
                s.close()
            raise
        except ValueError as exc:
            for s in streams:
                s.close()
            raise APIError(400, str(exc), param=_param_of(str(exc))) from None
        except EngineDeadError as exc:
            for s in streams:
                s.close()
            raise APIError(503, str(exc), code="engine_dead") from None
        return streams

    @staticmethod
    def default_max_tokens(e: AsyncLLMEngine, requested: int | None, ids: list[int]) -> int:
        """An unset max_tokens means the rest of the context."""
        return requested if requested is not None else max(1, e.engine.max_model_len - len(ids))


