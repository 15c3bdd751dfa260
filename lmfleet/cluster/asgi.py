"""Running one HTTP request through an ASGI app in this process, as items that can cross a process
boundary: how a replica answers a request the ingress forwarded to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


async def asgi_call(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> AsyncIterator[Any]:
    """Run one HTTP request through an ASGI app in this process: yields (status, headers, body,
    more) once, with whatever body was already sent (a whole JSON answer, usually), then, while
    `more`, the next body chunks. Closing the iterator early disconnects the request (a stream
    aborts). Each item crosses a process boundary, so a JSON answer travels as one item."""
    queue: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if disconnected.is_set():
            raise OSError("client disconnected")
        await queue.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": method, "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
             "scheme": "http", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.create_task(app(scope, receive, send))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    def ready_body(body: bytearray, more: bool) -> tuple[bytearray, bool]:
        """Append the body chunks already waiting, so that they go out as one item."""
        while more and not queue.empty():
            following = queue.get_nowait()
            if following is None or following["type"] != "http.response.body":
                queue.put_nowait(following)
                break
            body += following.get("body", b"")
            more = following.get("more_body", False)
        return body, more

    complete = False
    try:
        while True:
            message = await queue.get()
            if message is None:
                complete = True
                if task.exception() is not None:
                    raise task.exception()
                return
            if message["type"] == "http.response.start":
                body, more = ready_body(bytearray(), True)
                complete = not more
                yield (message["status"], [(k.decode(), v.decode()) for k, v in message.get("headers", [])],
                       bytes(body), more)
                if complete:
                    return
            elif message["type"] == "http.response.body":
                body, more = ready_body(bytearray(message.get("body", b"")), message.get("more_body", False))
                if body:
                    yield bytes(body)
                if not more:
                    complete = True
                    return
    finally:
        disconnected.set()
        if not task.done():
            if complete:  # the response went out whole: let the app finish its own clean-up
                try:
                    await asyncio.wait_for(task, timeout=5)
                except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - nothing is waiting for it
                    task.cancel()
            else:  # the caller went away (cancelled, timed out): stop the request, freeing its blocks
                task.cancel()
