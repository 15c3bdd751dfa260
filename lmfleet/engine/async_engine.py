"""AsyncLLMEngine: the step loop on a background thread, one async stream per request.

Requests are validated in the caller's thread (reading only the engine's fixed settings) and
handed to the loop through a queue, as are aborts: an event loop serving HTTP never waits for a
model step to finish.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmfleet.engine.engine import LLMEngine, Prompt, RequestOutput
from lmfleet.engine.params import SamplingParams


class EngineDeadError(RuntimeError):
    """The step loop died or was shut down; the engine takes no more requests."""


class RequestFailedError(RuntimeError):
    """The engine failed this one request (the others go on); the message says why."""


class RequestStream:
    """The outputs of one request, as an async iterator. `close()` (or leaving an `async for`
    early and closing) aborts the request if it has not finished, freeing its blocks."""

    def __init__(self, engine: AsyncLLMEngine, request_id: str):
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.error is not None:
            self.finished = True
            self.close()
            raise RequestFailedError(f"request {self.request_id} failed in the engine: {item.error}")
        if item.finished:
            self.finished = True
            self.close()
        return item

    def close(self) -> None:
        self.engine._streams.pop(self.request_id, None)
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_death: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        # Called on the loop's thread once the loop died and every open stream was told (a
        # server uses it to exit, so that its supervisor restarts it). Given here, before the
        # loop starts, so a loop that dies at once still calls it.
        self.on_death = on_death
        self.last_step_time = time.monotonic()  # when the loop last finished a step or idled
        self._thread = threading.Thread(target=self._loop, name="lmfleet-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopped

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                self._commands.append(("abort", request_id))

    def _apply_commands(self) -> None:
        """Queued adds and aborts; one that raises fails its own request's stream, nothing else."""
        while self._commands:
            kind, payload = self._commands.popleft()
            request_id = payload[2] if kind == "add" else payload
            try:
                if kind == "add":
                    ids, params, _, arrival = payload
                    if request_id in self._streams:  # not closed before the loop saw it
                        self.engine.add_request(ids, params, request_id, arrival, validated=True)
                else:
                    self.engine.abort(request_id)
            except Exception as exc:  # noqa: BLE001
                self.engine.abort(request_id)
                self._deliver(request_id, RequestFailedError(f"request {request_id} could not be queued: "
                                                             f"{type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        while not self._stopped:
            try:
                self._apply_commands()
                if not self.engine.has_unfinished_requests():
                    self.last_step_time = time.monotonic()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.last_step_time = time.monotonic()
            except BaseException as exc:  # the loop is dead: tell every waiting stream
                self.error = exc
                for request_id in list(self._streams):
                    self._deliver(request_id, EngineDeadError(f"engine step failed: {exc!r}"))
                self._shutdown_engine()
                if self.on_death is not None:
                    self.on_death(exc)
                return
            for out in outputs:
                self._deliver(out.request_id, out)

    def _shutdown_engine(self) -> None:
        try:
            shutdown = getattr(self.engine, "shutdown", None)
            if shutdown is not None:
                shutdown()
        except Exception:  # noqa: BLE001 - stopping what is left must not hide why the engine ended
            logging.getLogger("lmfleet.engine").exception("stopping the engine's workers failed")

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> RequestStream:
        """Validate and queue a request (raises ValueError naming the problem, before anything is
        queued); returns its stream. Call from a running event loop."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        params = params or SamplingParams()
        ids = self.engine.validate(prompt, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.append(("add", (ids, params, request_id, time.monotonic())))
        self._wake.set()
        if not self.is_running:  # the loop died or stopped while this stream was registered
            self._deliver(request_id, EngineDeadError("the engine is not running"))
        return stream

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (cumulative, with deltas) until it finishes; closing the
        stream early (a client went away) aborts the request and frees its blocks."""
        stream = self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wake.set()

    @property
    def num_unfinished(self) -> int:
        """Requests accepted and not finished (queued for the loop, waiting or running)."""
        return len(self._streams)

    def status(self) -> dict[str, Any]:
        """Counters and gauges of the engine (read without stopping the loop; a snapshot)."""
        return {**self.engine.running_status(), **self.engine.stats}

    def shutdown(self) -> None:
        """Stop the loop after its current step; every stream still open ends with EngineDeadError."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._shutdown_engine()
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError("the engine was shut down before this request finished"))
