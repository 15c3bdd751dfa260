"""What every HTTP app of lmfleet applies, written once: the request-body size limit (checked
before the body is all read) and the mapping of errors to OpenAI-shaped JSON. Which paths need
a key is `auth.needs_key`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmfleet.serve.frontend import APIError

# What a request whose client left gets, should anything still be listening (nginx's code).
CLIENT_CLOSED = 499
METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus's text format


def over_limit(content_length: bytes | str | None, limit: int) -> bool:
    """A declared Content-Length above the limit (an undeclared one is counted while reading)."""
    if content_length is None:
        return False
    text = content_length.decode("latin-1") if isinstance(content_length, bytes) else content_length
    return text.isdigit() and int(text) > limit


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes | None:
    """The whole body from its chunks, or None as soon as it grows past `limit` bytes."""
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


class BodyLimit:
    """ASGI middleware: bodies over `limit` bytes get 413 before the app reads them."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def _reject(self, send: Any) -> None:
        exc = body_too_large(self.limit)
        body = json.dumps(exc.body()).encode()
        await send({"type": "http.response.start", "status": exc.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if over_limit(length, self.limit):
            return await self._reject(send)
        if length is not None:  # the server enforces a declared length
            return await self.app(scope, receive, send)
        # No length given (chunked): read up to the limit, then replay.
        disconnected = False

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    disconnected = True
                    return
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        body = await read_limited(chunks(), self.limit)
        if disconnected:
            return
        if body is None:
            return await self._reject(send)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def install_error_handlers(app: FastAPI, error_response: Callable[..., JSONResponse]) -> None:
    """Every failure as `error_response(status, message, type_=None, param=None, code=None,
    headers=None)`: APIErrors as raised, body validation as 400 naming the field (invalid JSON
    as `invalid_json`), unknown routes and methods as 404/405, anything else as a 500 that names
    only the exception's type."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                                  code="invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            message = f"{param} is required"
        elif param:
            message = f"{param}: {message}"
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


def install_metrics_and_version(app: FastAPI, render: Callable[[], bytes], authorize: Callable[..., Any],
                                metrics_responses: dict[int | str, Any] | None = None) -> None:
    """GET /metrics (Prometheus text from `render`, behind `authorize`) and GET /version."""
    from lmfleet import __version__

    @app.get("/metrics", response_class=PlainTextResponse, responses=metrics_responses)
    async def prometheus(key: str = Depends(authorize)) -> Response:
        return Response(render(), media_type=METRICS_MEDIA_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}
