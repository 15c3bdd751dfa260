"""AsyncLLMEngine: the step loop on a background thread, one async stream per request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence as Seq
from typing import Any

from lmfleet.engine.engine import LLMEngine, RequestOutput
from lmfleet.engine.params import SamplingParams


class EngineDeadError(RuntimeError):
    """The step loop died; the engine takes no more requests."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="lmfleet-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> AsyncLLMEngine:
        return cls(LLMEngine(model, **kwargs))

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._stopped

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_unfinished_requests()
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    outputs = self.engine.step()
            except BaseException as exc:  # the loop is dead: tell every waiting stream
                self.error = exc
                for request_id in list(self._queues):
                    self._deliver(request_id, EngineDeadError(f"engine step failed: {exc!r}"))
                return
            for out in outputs:
                self._deliver(out.request_id, out)

    async def generate(self, prompt: str | Seq[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (cumulative, with deltas) until it finishes.

        Invalid input raises ValueError before anything is queued; closing the stream early
        (a client went away) aborts the request and frees its blocks."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            request_id = self.engine.add_request(prompt, params, request_id)
            self._queues[request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            return self.engine.abort(request_id)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return self.engine.running_status()

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
