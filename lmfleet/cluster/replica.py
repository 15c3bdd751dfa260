"""One model replica on Ray Serve: an AsyncLLMEngine and the FastAPI app of `lmfleet serve`, run in
process on every request the ingress forwards, so the API is exactly that of one server."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve

from lmfleet.cluster.asgi import asgi_call
from lmfleet.cluster.metrics_store import PUSH_S, store_handle
from lmfleet.serve.auth import KeyChecker
from lmfleet.serve.frontend import ServeSettings


class AppReplica:
    """What every lmfleet replica does around its FastAPI app: answer each request the ingress
    forwards by running it through the app in process, and push the app's metrics to the store."""

    def serve_app(self, app: Any, render: Callable[[], bytes]) -> None:
        """Call once from the replica's __init__, on Ray Serve's event loop."""
        self.app, self._render = app, render
        self.replica = serve.get_replica_context().replica_tag
        self.where = {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}
        self._store = None
        self._pusher = asyncio.get_event_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        while True:
            try:
                if self._store is None:
                    self._store = store_handle()
                if self._store is not None:
                    await self._store.put.remote(self.replica, self._render().decode(), self.where)
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                self._store = None
            await asyncio.sleep(PUSH_S)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                     routing_key: str | None = None, avoid: str | None = None) -> AsyncIterator[Any]:
        """One forwarded HTTP request: see `asgi_call` for what it yields; the first item also
        names this replica (`routing_key` and `avoid` are for the router)."""
        first = True
        async for item in asgi_call(self.app, method, path, query, headers, body):
            if first:
                item, first = (*item, self.replica), False
            yield item


# The per-replica options (concurrency, queue, resources, router, shutdown) are set by `deploy`.
@serve.deployment(health_check_period_s=2, health_check_timeout_s=10)
class LLMReplica(AppReplica):
    def __init__(self, model_dir: str, engine_kwargs: dict[str, Any], settings: dict[str, Any],
                 key_digests: list[str], threads: int, wedged_after_s: float = 60.0):
        import torch

        from lmfleet.engine import AsyncLLMEngine, LLMEngine
        from lmfleet.serve.app import build_app

        torch.set_num_threads(max(1, threads))
        self.engine = AsyncLLMEngine(LLMEngine(model_dir, **engine_kwargs))
        app = build_app(self.engine, ServeSettings(**settings))
        # Ray holds only the keys' digests (its state is visible to anyone on the cluster).
        app.state.front.checker = KeyChecker.from_digests(key_digests)
        self.wedged_after_s = wedged_after_s
        self.serve_app(app, app.state.front.metrics.render)

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: the engine loop died, or it holds
        requests and has not finished a step for `wedged_after_s`."""
        if not self.engine.is_running:
            raise RuntimeError(f"engine loop is not running: {self.engine.error!r}")
        idle_for = time.monotonic() - self.engine.last_step_time
        if self.engine.num_unfinished and idle_for > self.wedged_after_s:
            raise RuntimeError(f"engine loop wedged: no step for {idle_for:.0f} s with requests waiting")
