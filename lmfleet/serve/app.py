"""The OpenAI-compatible HTTP API over an AsyncLLMEngine (FastAPI app factory).

    app = build_app(lambda: AsyncLLMEngine(LLMEngine("runs/tiny/final")), ServeSettings("tiny"))

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, POST /tokenize,
POST /detokenize, GET /v1/stats, GET /health, GET /metrics, GET /version, and the web console
under GET /ui. Every error is a JSON body in the OpenAI shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for client mistakes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lmfleet import __version__
from lmfleet.engine import AsyncLLMEngine
from lmfleet.engine.async_engine import EngineDeadError, RequestFailedError, RequestStream
from lmfleet.engine.engine import RequestOutput
from lmfleet.serve import protocol as P
from lmfleet.serve.console import console_response
from lmfleet.serve.frontend import STATUS_TYPES, APIError, Frontend, ServeSettings, error_body, merge_streams
from lmfleet.serve.http_rules import CLIENT_CLOSED, BodyLimit, install_error_handlers, install_metrics_and_version
from lmfleet.serve.stats import stats_from_families


class _SSEResponse(StreamingResponse):
    """A server-sent-event stream that always closes its generator (aborting the engine request)
    however the response ends: finished, client gone, or cancelled."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def build_app(engine: AsyncLLMEngine | Callable[[], AsyncLLMEngine], settings: ServeSettings,
              on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The API app. `engine` may be a factory: it is then built on a thread when the app starts,
    and /health answers 503 until it is ready; if it raises, `on_load_error` hears of it (a
    server stops then, rather than answering 503 for ever)."""
    front = Frontend(engine if isinstance(engine, AsyncLLMEngine) else None, settings)
    metrics = front.metrics

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if front.engine is None:
            def load() -> None:
                try:
                    front.engine = engine()
                except BaseException as exc:  # noqa: BLE001 - reported by /health
                    front.load_error = exc
                    if on_load_error is not None:
                        on_load_error(exc)
                    else:
                        print(f"error: the model failed to load: {exc}", file=sys.stderr, flush=True)
            threading.Thread(target=load, name="lmfleet-load", daemon=True).start()
        grpc_server = None
        if settings.grpc_port is not None:
            from lmfleet.serve.grpc_server import start_grpc

            grpc_server = await start_grpc(front, settings.grpc_host, settings.grpc_port, settings.ssl_keyfile,
                                           settings.ssl_certfile)
        yield
        if grpc_server is not None:
            await grpc_server.stop(grace=5)
        if front.engine is not None:
            front.engine.shutdown()

    docs = settings.enable_docs
    app = FastAPI(title="lmfleet", version=__version__, lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.front = front
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    # ---- errors ----------------------------------------------------------------------------------
    def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                       code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        metrics.http_errors.labels(settings.model_name, str(status)).inc()
        return JSONResponse(error_body(message, type_ or STATUS_TYPES.get(status, "invalid_request_error"),
                                       param, code), status_code=status, headers=headers)

    install_error_handlers(app, error_response)

    # ---- guards ----------------------------------------------------------------------------------
    async def authorize(request: Request) -> str:
        return front.authorize(request.headers.get("authorization"), request.url.path)

    def admit(body: P._SamplingRequest) -> AsyncLLMEngine:
        e = front.admit(body.model)
        try:
            body.check()
        except P.UnsupportedField as exc:
            raise APIError(400, str(exc), param=exc.field) from None
        return e

    start, default_max_tokens = front.start, front.default_max_tokens

    async def gather(streams: list[RequestStream]) -> list[RequestOutput]:
        last: dict[int, RequestOutput] = {}
        try:
            async for i, out in merge_streams(streams):
                last[i] = out
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_dead") from None
        except RequestFailedError as exc:
            raise APIError(500, str(exc), "server_error", code="request_failed") from None
        return [last[i] for i in range(len(streams))]

    async def collect(streams: list[RequestStream], request: Request) -> list[RequestOutput] | None:
        """Every stream's final output; None when the client went away first (its requests are
        then aborted in the engine, their blocks freed, nothing more generated for nobody)."""
        work = asyncio.ensure_future(gather(streams))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            gone.cancel()
        if work.done():
            return work.result()
        work.cancel()  # closes every stream: the engine aborts them
        await asyncio.gather(work, return_exceptions=True)
        return None

    def observe(out: RequestOutput) -> None:
        metrics.finished(out.metrics, P.finish_reason(out.outputs[0]))

    def total_usage(outs: list[RequestOutput]) -> dict[str, Any]:
        return P.usage(sum(len(o.prompt_token_ids) for o in outs),
                       sum(len(c.token_ids) for o in outs for c in o.outputs),
                       cached_tokens=sum(o.num_cached_tokens for o in outs))

    async def stream_events(streams: list[RequestStream], n: int, chunk: Callable[..., dict[str, Any] | None],
                            finish: Callable[[list[RequestOutput]], list[dict[str, Any]]]) -> AsyncIterator[str]:
        """SSE: one chunk per choice delta, then the closing chunks, then [DONE]. A failure after
        the stream started is reported as an error event, never a hang."""
        finals: dict[int, RequestOutput] = {}
        last_time: dict[int, float] = {}
        try:
            async for i, out in merge_streams(streams):
                now = time.monotonic()
                for c in out.outputs:
                    index = i * n + c.index
                    if c.delta_token_ids:
                        if index in last_time:
                            gap = (now - last_time[index]) / len(c.delta_token_ids)
                            for _ in c.delta_token_ids:
                                metrics.itl.observe(gap)
                        last_time[index] = now
                    data = chunk(index, c)
                    if data is not None:
                        yield _sse(data)
                if out.finished:
                    finals[i] = out
                    observe(out)
            for data in finish([finals[i] for i in range(len(streams))]):
                yield _sse(data)
            yield _sse("[DONE]")
        except (EngineDeadError, RequestFailedError) as exc:
            # The status line (200) is gone: the event carries the error, and /metrics counts it under
            # the status `gather` answers the same failure with, so error-rate alerts see streams too.
            dead = isinstance(exc, EngineDeadError)
            metrics.http_errors.labels(settings.model_name, "503" if dead else "500").inc()
            yield _sse(error_body(str(exc), "service_unavailable" if dead else "server_error", None,
                                  "engine_dead" if dead else "request_failed"))
            yield _sse("[DONE]")

    # ---- endpoints -------------------------------------------------------------------------------
    @app.post("/v1/completions", responses=P.generation_responses())
    async def completions(body: P.CompletionRequest, request: Request, key: str = Depends(authorize)) -> Response:
        e = admit(body)
        try:
            prompts = body.prompts()
        except P.UnsupportedField as exc:
            raise APIError(400, str(exc), param=exc.field) from None
        streams = await start(e, prompts, lambda ids: body.sampling_params(
            default_max_tokens(e, body.max_tokens, ids), body.logprobs))
        request_id, created, tok = P.new_id("cmpl"), int(time.time()), e.engine.tokenizer
        n = body.n

        def logprobs_of(c: Any, entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any] | None:
            return P.completion_logprobs(entries, tok, offset) if body.logprobs is not None else None

        if not body.stream:
            outs = await collect(streams, request)
            if outs is None:
                return Response(status_code=CLIENT_CLOSED)
            for out in outs:
                observe(out)
            choices = [{"index": i * n + c.index, "text": c.text, "logprobs": logprobs_of(c, c.logprobs or []),
                        "finish_reason": P.finish_reason(c)} for i, out in enumerate(outs) for c in out.outputs]
            return JSONResponse(P.envelope("text_completion", request_id, settings.model_name, choices,
                                           total_usage(outs), created))

        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        offsets: dict[int, int] = {}

        def chunk(index: int, c: Any) -> dict[str, Any] | None:
            if not c.delta_text and not c.delta_token_ids and c.finish_reason is None:
                return None
            entries = c.delta_logprobs or []
            lp = logprobs_of(c, entries, offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(c.delta_text)
            return P.envelope("text_completion", request_id, settings.model_name,
                              [{"index": index, "text": c.delta_text, "logprobs": lp,
                                "finish_reason": P.finish_reason(c)}], None, created, null_usage=with_usage)

        def finish(outs: list[RequestOutput]) -> list[dict[str, Any]]:
            return [P.envelope("text_completion", request_id, settings.model_name, [], total_usage(outs),
                               created)] if with_usage else []

        return _SSEResponse(stream_events(streams, n, chunk, finish), media_type="text/event-stream")

    @app.post("/v1/chat/completions", responses=P.generation_responses())
    async def chat_completions(body: P.ChatCompletionRequest, request: Request,
                               key: str = Depends(authorize)) -> Response:
        e = admit(body)
        tok = e.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it cannot take chat messages", param="messages")
        try:
            ids = await asyncio.to_thread(tok.apply_chat_template, [m.as_template_dict() for m in body.messages],
                                          add_generation_prompt=body.add_generation_prompt, tokenize=True)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        streams = await start(e, [ids], lambda ids_: body.sampling_params(
            default_max_tokens(e, body.requested_max_tokens, ids_), body.num_logprobs))
        request_id, created, n = P.new_id("chatcmpl"), int(time.time()), body.n
        logprobs_on = body.num_logprobs is not None

        if not body.stream:
            outs = await collect(streams, request)
            if outs is None:
                return Response(status_code=CLIENT_CLOSED)
            (out,) = outs
            observe(out)
            choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": P.chat_logprobs(c.logprobs or [], tok) if logprobs_on else None,
                        "finish_reason": P.finish_reason(c)} for c in out.outputs]
            return JSONResponse(P.envelope("chat.completion", request_id, settings.model_name, choices,
                                           total_usage([out]), created))

        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        started: set[int] = set()

        def chunk(index: int, c: Any) -> dict[str, Any] | None:
            delta: dict[str, Any] = {}
            if index not in started:
                started.add(index)
                delta["role"] = "assistant"
            if c.delta_text or "role" in delta:
                delta["content"] = c.delta_text
            if not delta and c.finish_reason is None and not c.delta_token_ids:
                return None
            entries = c.delta_logprobs or []
            lp = P.chat_logprobs(entries, tok) if logprobs_on else None
            return P.envelope("chat.completion.chunk", request_id, settings.model_name,
                              [{"index": index, "delta": delta, "logprobs": lp,
                                "finish_reason": P.finish_reason(c)}], None, created, null_usage=with_usage)

        def finish(outs: list[RequestOutput]) -> list[dict[str, Any]]:
            return [P.envelope("chat.completion.chunk", request_id, settings.model_name, [], total_usage(outs),
                               created)] if with_usage else []

        return _SSEResponse(stream_events(streams, n, chunk, finish), media_type="text/event-stream")

    def tokenizer_of(model: str | None) -> Any:
        if model is not None and model != settings.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        tok = front.ready_engine().engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer", param="model")
        return tok

    @app.post("/tokenize", responses=P.error_responses(400, 401, 404, 413, 429, 503))
    async def tokenize(body: P.TokenizeRequest, key: str = Depends(authorize)) -> dict[str, Any]:
        try:
            body.check()
        except P.UnsupportedField as exc:
            raise APIError(400, str(exc), param=exc.field) from None
        tok = tokenizer_of(body.model)
        try:
            if body.messages is not None:
                ids = await asyncio.to_thread(tok.apply_chat_template, [m.as_template_dict() for m in body.messages],
                                              add_generation_prompt=body.add_generation_prompt, tokenize=True)
            else:
                ids = await asyncio.to_thread(tok.encode, body.prompt, add_special_tokens=body.add_special_tokens)
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from None
        return {"count": len(ids), "max_model_len": front.ready_engine().engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", responses=P.error_responses(400, 401, 404, 413, 429, 503))
    async def detokenize(body: P.DetokenizeRequest, key: str = Depends(authorize)) -> dict[str, Any]:
        tok = tokenizer_of(body.model)
        vocab = front.ready_engine().engine.model.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens)}

    @app.get("/v1/models", responses=P.error_responses(401, 429))
    async def models(key: str = Depends(authorize)) -> dict[str, Any]:
        e = front.engine
        card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "lmfleet"}
        if e is not None:
            card["max_model_len"] = e.engine.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/health", responses=P.error_responses(503))
    async def health() -> Response:
        try:
            front.ready_engine()
        except APIError as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/stats", responses=P.error_responses(401))
    async def stats(key: str = Depends(authorize)) -> dict[str, Any]:
        """The same counters and histograms as /metrics, as JSON (see `serve.stats`)."""
        healthy = front.engine is not None and front.engine.is_running and not front.draining
        answer = stats_from_families(metrics.registry.collect(), settings.model_name, {"local": {"healthy": healthy}})
        return answer | {"num_replicas": 1, "min_replicas": 1}

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/{name}", include_in_schema=False)
    async def console(request: Request) -> Response:
        return console_response(request.url.path, front.checker.enabled)

    install_metrics_and_version(app, metrics.render, authorize, P.error_responses(401))
    return app


def begin_draining(app: FastAPI) -> None:
    """Stop admitting requests (503) while in-flight ones finish: the first step of a graceful
    shutdown."""
    app.state.front.draining = True
