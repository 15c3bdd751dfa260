"""The request-body size limit the single server and the cluster ingress both apply, written once
(checked before the body is all read). Which paths need a key is `auth.needs_key`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from lmfleet.serve.frontend import APIError

# What a request whose client left gets, should anything still be listening (nginx's code).
CLIENT_CLOSED = 499


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
