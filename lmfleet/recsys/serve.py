"""`lmfleet recsys serve`: a SASRec model behind HTTP, with dynamic micro-batching.

    POST /v1/recommendations  {"user_id": "42" | "history": ["50", "172"], "k": 10, "exclude_seen": true}
    POST /v1/events           {"user_id": "42", "items": ["50"], "event_id": "..."}    (or "item_id": "50")
    GET  /v1/models, /health, /metrics, /version

A user's history is its sequence in the dataset given with --data, followed by the events posted
since (kept in the history store: this process's memory, or Redis shared by every replica).
Concurrent requests are scored together: the batcher takes up to `max_batch` waiting requests,
waiting at most `max_wait_ms` after the first, runs one forward over their padded histories and
one matmul against the item table, then a top-k per request. A history's scores do not depend
on the other requests of its batch, so a batched answer is the offline `model.recommend(history)`.

A user with no history (unknown to the dataset, no events) gets the most popular training items
(`"source": "popularity"`), or 404 with `cold_start="error"`. Errors are OpenAI-shaped JSON:
4xx for client mistakes (the message names the field), 429 when the queue is full, 503 while the
history store is unreachable (retry; an event with an `event_id` is written once).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lmfleet import __version__
from lmfleet.errors import ConfigError, DataError
from lmfleet.recsys.model import load_sasrec, max_item_norm
from lmfleet.recsys.store import EventConflict, HistoryStore, StoreError, StoreTimeout, StoreUnavailable, open_store
from lmfleet.serve.auth import KeyChecker, RateLimiter, needs_key, rate_limited
from lmfleet.serve.frontend import STATUS_TYPES, APIError, check_access, error_body
from lmfleet.serve.http_rules import BodyLimit, install_error_handlers, install_metrics_and_version

MAX_USER_ID = 128  # characters
MAX_REQUEST_HISTORY = 10_000  # items a request may send
MAX_EVENTS_PER_REQUEST = 1000
STORE_THREADS = 8  # concurrent history-store operations per server
SCORE_BUDGET = 1 << 28  # max_batch x (catalog + 1) scores of one batch (1 GiB of float32)
COLD_START = ("popularity", "error")
MAX_K = 100_000
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.075, 0.1,
                   0.25, 0.5, 1.0, 2.5)


@dataclass
class RecsysSettings:
    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_batch: int = 64  # requests scored together
    max_wait_ms: float = 2.0  # how long the first request of a batch waits for others
    max_queued: int = 2048  # requests waiting for a batch before 429
    max_k: int = 1000  # at most MAX_K
    max_events: int = 200  # events kept per user
    max_users: int = 1_000_000  # users with events in the in-memory store
    cold_start: str = "popularity"
    history_store: str | None = None  # None/"memory" or redis://HOST:PORT/DB
    store_prefix: str = "lmfleet:recsys"
    max_body_bytes: int = 1024 * 1024
    rate_limit: float | None = None
    rate_burst: int | None = None
    protect_metrics: bool = False
    threads: int | None = None  # torch threads of the scoring thread

    def check(self) -> RecsysSettings:
        bounds = {"max_batch": (1, 4096), "max_queued": (1, 1_000_000), "max_k": (1, MAX_K),
                  "max_events": (1, 100_000), "max_users": (1, 100_000_000)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be an integer in [{low}, {high}]")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError(f"--max-wait-ms {self.max_wait_ms} must be in [0, 1000]")
        if self.cold_start not in COLD_START:
            raise ConfigError(f"--cold-start {self.cold_start!r} is not one of {list(COLD_START)}")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise ConfigError(f"--threads {self.threads} must be in [1, 256]")
        return self


# ---- the model, the users and the items ------------------------------------------------------------
class Recommender:
    """A SASRec directory and, optionally, the dataset whose users it knows (their sequences)."""

    def __init__(self, model_dir: str | Path, data_dir: str | Path | None = None):
        self.model, self.item_ids, tensors = load_sasrec(model_dir)
        self.item_index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        self.max_norm = max_item_norm(self.model.item_embedding.weight)  # the weights do not change here
        self.num_items = len(self.item_ids)
        counts = tensors.get("item_counts")
        if counts is None or counts.shape != (self.num_items + 1,):
            counts = torch.zeros(self.num_items + 1)
        # The popularity answer: most training interactions first, ties by lower id.
        order = np.lexsort((np.arange(self.num_items + 1), -counts.double().numpy()))
        order = order[order != 0][:MAX_K]
        self.popular = order.tolist()  # the MAX_K most popular: what any k can ask for
        self.popular_scores = counts.double()[torch.from_numpy(order)].tolist()
        self.user_index: dict[str, int] = {}
        self.data = None
        if data_dir is not None:
            from lmfleet.recsys.data import RecData

            data = RecData(data_dir)
            if data.item_ids != self.item_ids:
                raise DataError(f"--data {data_dir}: its catalog ({data.num_items} items) is not the model's "
                                f"({self.num_items} items, {Path(model_dir) / 'item_ids.json'})")
            self.data = data
            self.user_index = {u: i for i, u in enumerate(data.user_ids)}

    def base_history(self, user: str) -> list[int]:
        index = self.user_index.get(user)
        return [] if index is None else self.data.sequence(index).tolist()

    def items_of(self, values: list[Any], field_name: str) -> list[int]:
        """Item indices of a request's item ids (strings, or integers for numeric ids); 400 names a bad one."""
        out = []
        for position, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise APIError(400, f"{field_name}[{position}]: item ids are strings or integers, not "
                                    f"{type(value).__name__} {value!r}"[:300], param=field_name)
            index = self.item_index.get(str(value))
            if index is None:
                raise APIError(400, f"{field_name}[{position}]: unknown item id {str(value)[:64]!r} (the catalog has "
                                    f"{self.num_items} items)", param=field_name, code="unknown_item")
            out.append(index)
        return out

    def known_items(self, ids: list[str]) -> list[int]:
        """Indices of stored event ids, skipping ids this model's catalog lacks (a retrained catalog)."""
        return [self.item_index[i] for i in ids if i in self.item_index]

    @torch.no_grad()
    def score(self, histories: list[list[int]], ks: list[int], excludes: list[list[int]]) -> list[tuple[list[int], list[float]]]:
        """What `model.recommend` gives for each history: one padded forward, one matmul, top-k per row."""
        return self.model.recommend_rows(histories, ks, excludes, self.max_norm)

    def popularity(self, k: int) -> tuple[list[int], list[float]]:
        return self.popular[:k], self.popular_scores[:k]


# ---- dynamic micro-batching ------------------------------------------------------------------------
class MicroBatcher:
    """Requests wait in a queue; one scoring thread takes up to `max_batch` of them at a time, the
    first having waited at most `max_wait_s` for company, and answers them all from one forward."""

    def __init__(self, recommender: Recommender, settings: RecsysSettings, metrics: RecsysMetrics):
        self.recommender, self.settings, self.metrics = recommender, settings, metrics
        self.pending: deque[tuple[list[int], int, list[int], asyncio.Future, float]] = deque()
        self.wakeup = asyncio.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmfleet-recsys")
        self.task: asyncio.Task | None = None
        self.failed: BaseException | None = None
        self.last_progress = time.monotonic()
        if settings.threads is not None:
            self.pool.submit(torch.set_num_threads, settings.threads).result()

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.task = (loop or asyncio.get_running_loop()).create_task(self._run())
        self.task.add_done_callback(self._ended)
        self.last_progress = time.monotonic()

    def _ended(self, task: asyncio.Task) -> None:
        """The loop stopped (cancelled at shutdown, or a bug): every waiting request gets 503 now,
        not a hang, and so does every later one."""
        self.failed = RuntimeError("stopped") if task.cancelled() else (task.exception() or RuntimeError("ended"))
        while self.pending:
            future = self.pending.popleft()[3]
            if not future.done():
                future.set_exception(APIError(503, f"the scoring loop stopped: {self.failed!r}", code="engine_dead"))

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    def stalled_for(self) -> float:
        """Seconds without a finished batch while requests wait (0 when idle)."""
        return time.monotonic() - self.last_progress if self.pending else 0.0

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.pool.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    async def submit(self, history: list[int], k: int, exclude: list[int]) -> tuple[list[int], list[float]]:
        if self.failed is not None:
            raise APIError(503, f"the scoring loop failed: {self.failed!r}", code="engine_dead")
        if len(self.pending) >= self.settings.max_queued:
            raise APIError(429, f"the request queue is full ({self.settings.max_queued} waiting)", code="queue_full",
                           headers={"Retry-After": "1"})
        future = asyncio.get_running_loop().create_future()
        self.pending.append((history, k, exclude, future, time.perf_counter()))
        self.wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        max_wait = self.settings.max_wait_ms / 1000
        while True:
            if not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            first = self.pending[0][4]
            while len(self.pending) < self.settings.max_batch:
                left = first + max_wait - time.perf_counter()
                if left <= 0:
                    break
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), left)
                except (TimeoutError, asyncio.TimeoutError):  # not the same class before Python 3.11
                    break
            batch = [self.pending.popleft() for _ in range(min(self.settings.max_batch, len(self.pending)))]
            batch = [b for b in batch if not b[3].done()]  # the client left while it waited
            if not batch:
                continue
            now = time.perf_counter()
            for b in batch:
                self.metrics.queue_time.observe(now - b[4])
            self.metrics.batch_size.observe(len(batch))
            try:
                results = await loop.run_in_executor(self.pool, self.recommender.score, [b[0] for b in batch],
                                                     [b[1] for b in batch], [b[2] for b in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request hears of it
                for b in batch:
                    if not b[3].done():
                        b[3].set_exception(APIError(500, f"scoring failed: {type(exc).__name__}", "server_error"))
                self.last_progress = time.monotonic()
                continue
            for b, result in zip(batch, results):
                if not b[3].done():
                    b[3].set_result(result)
            self.last_progress = time.monotonic()


# ---- metrics -------------------------------------------------------------------------------------
class _Gauges(Collector):
    def __init__(self, server: RecsysServer):
        self.server = server

    def collect(self) -> Any:
        waiting = GaugeMetricFamily("lmfleet_recsys:num_requests_waiting", "Requests waiting for a batch.",
                                    labels=["model_name"])
        batcher = self.server.batcher
        waiting.add_metric([self.server.settings.model_name], batcher.waiting if batcher else 0)
        yield waiting


class RecsysMetrics:
    def __init__(self, model_name: str, max_batch: int):
        self.registry = CollectorRegistry()
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.latency = Histogram("lmfleet_recsys:request_latency_seconds", "Request latency in the server.",
                                 labelnames=["model_name", "endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_time = Histogram("lmfleet_recsys:queue_time_seconds", "Time a request waited for its batch.",
                                    buckets=LATENCY_BUCKETS, **kw).labels(model_name)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, max_batch})
        self.batch_size = Histogram("lmfleet_recsys:batch_size", "Requests scored per forward.",
                                    buckets=[s for s in sizes if s <= max_batch], **kw).labels(model_name)
        self.requests = Counter("lmfleet_recsys:requests", "Requests answered, by endpoint and status.",
                                labelnames=["model_name", "endpoint", "status"], registry=self.registry)
        self.events = Counter("lmfleet_recsys:events", "Interactions appended through /v1/events.",
                              **kw).labels(model_name)
        self.event_repeats = Counter("lmfleet_recsys:event_repeats", "Events posted again with an event_id already "
                                     "appended (acknowledged, not appended).", **kw).labels(model_name)
        self.fallbacks = Counter("lmfleet_recsys:popularity_fallbacks", "Recommendations answered by popularity "
                                 "(a user with no history).", **kw).labels(model_name)
        self.store_errors = Counter("lmfleet_recsys:history_store_errors", "History-store operations that failed.",
                                    **kw).labels(model_name)
        self.model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)


# ---- the HTTP API ----------------------------------------------------------------------------------
ENDPOINTS = {"/v1/recommendations": "recommendations", "/v1/events": "events"}


class _Observe:
    """ASGI middleware: latency and status of every request to an API endpoint (a plain ASGI
    wrapper: Starlette's BaseHTTPMiddleware costs a task and a stream per request)."""

    def __init__(self, app: Any, metrics: RecsysMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            m = self.metrics
            m.latency.labels(m.model_name, endpoint).observe(time.perf_counter() - start)
            m.requests.labels(m.model_name, endpoint, str(status)).inc()


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendationRequest(_Body):
    user_id: StrictStr | StrictInt | None = Field(default=None, description="A user of the dataset or one that "
                                                  "posted events.")
    history: list[Any] | None = Field(default=None, description="Item ids, oldest first (instead of user_id).")
    k: StrictInt = Field(default=10, description="How many items to return.")
    exclude_seen: bool = True
    model: str | None = None


class EventRequest(_Body):
    user_id: StrictStr | StrictInt
    item_id: StrictStr | StrictInt | None = None
    items: list[Any] | None = None
    event_id: StrictStr | None = Field(default=None, description="Names the event: a repeat of an id already "
                                       "appended for this user is acknowledged and not appended again.")


class RecsysServer:
    """The state behind the app: model, store, batcher, metrics, access checks."""

    def __init__(self, recommender: Recommender, settings: RecsysSettings, store: HistoryStore | None = None):
        self.recommender, self.settings = recommender, settings.check()
        if settings.max_batch * (recommender.num_items + 1) > SCORE_BUDGET:
            raise ConfigError(f"--max-batch {settings.max_batch} x {recommender.num_items + 1:,} items is over "
                              f"{SCORE_BUDGET:,} scores per batch; lower --max-batch to at most "
                              f"{max(1, SCORE_BUDGET // (recommender.num_items + 1))}")
        self.store = store or open_store(settings.history_store, settings.max_events, settings.store_prefix,
                                         settings.max_users)
        self.metrics = RecsysMetrics(settings.model_name, settings.max_batch)
        self.metrics.registry.register(_Gauges(self))
        self.batcher: MicroBatcher | None = None
        self.checker = KeyChecker(settings.api_keys)
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
        self.draining = False
        self.store_pool = concurrent.futures.ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="lmfleet-store")
        self.store_waiting = 0

    def printable_id(self, value: str | int | None, field_name: str = "user_id") -> str:
        user = str(value)
        if isinstance(value, bool) or not user or len(user) > MAX_USER_ID or not user.isprintable():
            raise APIError(400, f"{field_name} must be 1 to {MAX_USER_ID} printable characters", param=field_name)
        return user

    async def call_store(self, fn: Any, *args: Any) -> Any:
        """A store operation: on the store's own threads when it does I/O (Redis), inline in memory;
        with STORE_THREADS * 4 already waiting on a slow store, 503 at once rather than a backlog."""
        if not self.store.blocking:
            return self._store_call(fn, *args)
        if self.store_waiting >= STORE_THREADS * 4:
            self.metrics.store_errors.inc()
            raise APIError(503, "the history store is slow: too many operations waiting for it; retry",
                           code="history_store_unavailable", headers={"Retry-After": "1"})
        self.store_waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.store_pool, self._store_call, fn, *args)
        finally:
            self.store_waiting -= 1

    def _store_call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except StoreUnavailable as exc:
            self.metrics.store_errors.inc()
            raise APIError(503, f"{exc}; retry (an event sent with an event_id is written once)",
                           code="history_store_unavailable",
                           headers={"Retry-After": "1"}) from None
        except StoreTimeout as exc:  # not 503: a retry on another replica could write an event twice
            self.metrics.store_errors.inc()
            raise APIError(504, f"{exc}; an event may or may not have been written (one sent with an event_id "
                                "can be retried: it is written once)", "service_unavailable",
                           code="history_store_timeout") from None
        except StoreError as exc:
            self.metrics.store_errors.inc()
            raise APIError(502, str(exc), "server_error", code="history_store_error") from None
        except EventConflict as exc:
            raise APIError(409, f"{exc}; nothing was written (an event id names one event: use a new one)",
                           param="event_id", code="event_id_conflict") from None

    async def recommend(self, body: RecommendationRequest) -> dict[str, Any]:
        s, r = self.settings, self.recommender
        if body.model is not None and body.model != s.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {s.model_name!r}",
                           param="model", code="model_not_found")
        if (body.user_id is None) == (body.history is None):
            raise APIError(400, "give one of user_id or history", param="user_id")
        limit = min(s.max_k, r.num_items)
        if not 1 <= body.k <= limit:
            raise APIError(400, f"k={body.k} must be in [1, {limit}] (the catalog has {r.num_items} items)", param="k")
        user = None
        if body.history is not None:
            if len(body.history) > MAX_REQUEST_HISTORY:
                raise APIError(400, f"history holds {len(body.history)} items; at most {MAX_REQUEST_HISTORY} are "
                                    "allowed", param="history")
            history = r.items_of(body.history, "history")
        else:
            user = self.printable_id(body.user_id)
            events = await self.call_store(self.store.events, [user])
            history = r.base_history(user) + r.known_items(events[0])
        exclude = history if body.exclude_seen else []
        source = "model"
        if not history:
            if s.cold_start == "error":
                if user is None:
                    raise APIError(400, "history is empty (this server has no popularity fallback)", param="history")
                raise APIError(404, f"user {user!r} has no history: post events to /v1/events or send a history",
                               param="user_id", code="unknown_user")
            items, scores = r.popularity(body.k)
            source = "popularity"
            self.metrics.fallbacks.inc()
        else:
            items, scores = await self.batcher.submit(history, body.k, exclude)
        return {"object": "recommendations", "model": s.model_name, "user_id": user, "source": source,
                "history_length": len(history),
                "data": [{"item_id": r.item_ids[i - 1], "score": score} for i, score in zip(items, scores)]}

    async def post_events(self, body: EventRequest) -> dict[str, Any]:
        user = self.printable_id(body.user_id)
        if (body.item_id is None) == (body.items is None):
            raise APIError(400, "give one of item_id or items", param="items")
        values = [body.item_id] if body.item_id is not None else body.items
        if not values or len(values) > MAX_EVENTS_PER_REQUEST:
            raise APIError(400, f"items holds {len(values)} items; send 1 to {MAX_EVENTS_PER_REQUEST}", param="items")
        event_id = None if body.event_id is None else self.printable_id(body.event_id, "event_id")
        indices = self.recommender.items_of(values, "items" if body.items is not None else "item_id")
        ids = [self.recommender.item_ids[i - 1] for i in indices]
        kept, repeat = await self.call_store(self.store.append, user, ids, event_id)
        if repeat:
            self.metrics.event_repeats.inc()
        else:
            self.metrics.events.inc(len(ids))
        return {"object": "events", "user_id": user, "accepted": 0 if repeat else len(ids), "repeat": repeat,
                "events_kept": kept}


def build_recsys_app(recommender: Recommender, settings: RecsysSettings, store: HistoryStore | None = None) -> FastAPI:
    server = RecsysServer(recommender, settings, store)
    metrics = server.metrics

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher = MicroBatcher(recommender, server.settings, metrics)
        server.batcher.start()
        yield
        await server.batcher.stop()
        server.store.close()

    app = FastAPI(title="lmfleet recsys", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                       code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, type_ or STATUS_TYPES.get(status, "invalid_request_error"),
                                       param, code), status_code=status, headers=headers)

    install_error_handlers(app, error_response)

    app.add_middleware(_Observe, metrics=metrics)

    async def authorize(request: Request) -> str:
        path = request.url.path
        if server.draining and path not in ("/health", "/metrics"):
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if not needs_key(path, settings.protect_metrics):
            return "anonymous"
        return check_access(server.checker, server.limiter if rate_limited(path) else None,
                            request.headers.get("authorization"))

    @app.post("/v1/recommendations")
    async def recommendations(body: RecommendationRequest, key: str = Depends(authorize)) -> Response:
        return JSONResponse(await server.recommend(body))  # plain JSON: no encoder walk over the answer

    @app.post("/v1/events")
    async def events(body: EventRequest, key: str = Depends(authorize)) -> Response:
        return JSONResponse(await server.post_events(body))

    @app.get("/v1/models")
    async def models(key: str = Depends(authorize)) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "owned_by": "lmfleet",
                                            "num_items": recommender.num_items, "max_len": recommender.model.config.max_len,
                                            "users": len(recommender.user_index)}]}

    @app.get("/health")
    async def health() -> Response:
        """503 only when this server cannot answer at all (draining, scoring loop stopped): an
        unreachable history store is shared by every server, so it is reported, not made a reason
        to take this one out of rotation (requests that send their history still work)."""
        batcher = server.batcher
        if server.draining or batcher is None or not batcher.alive:
            reason = "shutting down" if server.draining else "the scoring loop is not running"
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        store = "ok"
        if server.store.blocking:
            try:
                await asyncio.wait_for(asyncio.to_thread(server.store.ping), 2.0)
            except (StoreUnavailable, StoreTimeout, StoreError, TimeoutError, asyncio.TimeoutError):
                store = "unavailable"
        return JSONResponse({"status": "ok", "history_store": store})

    install_metrics_and_version(app, metrics.render, authorize)
    return app


def freeze_loaded_objects() -> None:
    """Leave the objects loaded at start-up (id maps, popularity lists: ~300k objects for a 100k-item
    catalog) out of the garbage collector's full passes, which otherwise stop the server for
    ~160 ms now and then (the p99 of a load test)."""
    gc.collect()
    gc.freeze()


def run_recsys_server(model_dir: str | Path, settings: RecsysSettings, data_dir: str | Path | None = None,
                      host: str = "127.0.0.1", port: int = 8000, ssl_keyfile: str | None = None,
                      ssl_certfile: str | None = None, shutdown_timeout: float = 10.0, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT (new requests get 503, in-flight ones finish)."""
    import uvicorn

    settings.check()
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise ConfigError("--ssl-keyfile and --ssl-certfile go together")
    recommender = Recommender(model_dir, data_dir)
    store = open_store(settings.history_store, settings.max_events, settings.store_prefix, settings.max_users)
    app = build_recsys_app(recommender, settings, store)
    freeze_loaded_objects()
    print(f"serving {settings.model_name}: {recommender.num_items:,} items, {len(recommender.user_index):,} users "
          f"with histories, history store {store.describe()}, batches of up to {settings.max_batch} "
          f"(wait {settings.max_wait_ms:g} ms)", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.server.draining = True
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout, ssl_keyfile=ssl_keyfile,
                            ssl_certfile=ssl_certfile)
    Server(config).run()

