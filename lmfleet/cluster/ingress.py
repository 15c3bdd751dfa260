"""The cluster's one endpoint: reads each request, checks keys, the body limit and the rate, picks
a routing key, forwards the request to a replica (retrying on another when the first could not
take it) and relays the answer; serves the cluster-wide /metrics and /health.

`Gateway` is the request handling, free of Ray Serve's deployment machinery (tests drive it with
a fake replica handle); `Ingress` is the deployment around it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from ray import serve
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmfleet import __version__
from lmfleet.cluster import ray_errors, stats
from lmfleet.cluster.metrics_merge import merge_families, merge_metrics
from lmfleet.cluster.metrics_store import PUSH_S, ensure_store
from lmfleet.serve.auth import KeyChecker, RateLimiter, is_console, needs_key, rate_limited
from lmfleet.serve.console import console_response
from lmfleet.serve.frontend import APIError, ServeSettings, check_access
from lmfleet.serve.http_rules import CLIENT_CLOSED, METRICS_MEDIA_TYPE, body_too_large, over_limit, read_limited
from lmfleet.serve.stats import stats_from_families

PREFIX_CHARS = 512  # characters (or token ids) of a prompt that make its routing key
STORE_TIMEOUT_S = 2.0  # the metrics store's answer, for /health and /metrics
STATS_TTL_S = 1.0  # /v1/stats is computed at most this often, however many consoles poll it
# Bodies above this are parsed for their routing key off the event loop (4 MiB of JSON: ~0.1 s).
PARSE_INLINE_BYTES = 64 * 1024
# Application states in which no request will be served (scaled to zero is RUNNING with 0 replicas).
FAILED_STATES = frozenset({"DEPLOY_FAILED", "UNHEALTHY", "NOT_DEPLOYED"})


def ingress_families(replicas: int, min_replicas: int, decisions: dict[str, int], in_flight: int,
                     errors: dict[int, int], waiting: int = 0, model_name: str = "") -> list[Any]:
    """The cluster endpoint's own metric families, after the replicas' merged ones."""
    out = [GaugeMetricFamily("lmfleet:num_replicas", "Replicas whose metrics arrived in the last 15 s.", value=replicas),
           GaugeMetricFamily("lmfleet:min_replicas", "The fewest replicas meant to run (--replicas, or the "
                             "--autoscale minimum; 0: scaling to zero is normal).", value=min_replicas)]
    counted = CounterMetricFamily("lmfleet:router_decisions", "Routing decisions of this ingress.", labels=["decision"])
    for decision, count in sorted(decisions.items()):
        counted.add_metric([decision], count)
    out += [counted,
            CounterMetricFamily("lmfleet:router_prefix_hits", "Requests sent to the replica holding their prefix.",
                                value=decisions.get("prefix_hit", 0)),
            CounterMetricFamily("lmfleet:router_retries", "Requests retried on another replica.",
                                value=decisions.get("retried", 0)),
            GaugeMetricFamily("lmfleet:ingress_requests_in_flight",
                              "Requests between arrival at the ingress and their last byte.", value=in_flight)]
    # On a cluster the backlog is here, not in an engine: a replica takes only what it decodes at once.
    queued = GaugeMetricFamily("lmfleet:ingress_requests_waiting", "Requests at the ingress beyond what the "
                               "reporting replicas take at once: waiting for a replica.", labels=["model_name"])
    queued.add_metric([model_name], waiting)
    out.append(queued)
    by_status = CounterMetricFamily("lmfleet:ingress_http_errors",
                                    "Requests the ingress answered with an error itself, by status.", labels=["status"])
    for status, count in sorted(errors.items()):
        by_status.add_metric([str(status)], count)
    return [*out, by_status]


@dataclass
class IngressConfig:
    max_attempts: int = 3  # tries on different replicas before 503
    request_timeout_s: float = 600.0
    min_replicas: int = 1  # 0: scaled to zero is a normal state, not an outage
    retry_pause_s: float = 0.2
    per_replica: int = 0  # requests one replica takes at once (0: unknown, no waiting count)
    console: bool = False  # /ui and /v1/stats (the language models' endpoint)
    deployment: str = "LLMReplica"


def routing_key(path: str, body: bytes, session: str | None) -> str | None:
    """What makes two requests likely to share KV-cache blocks: the session, else the start of the
    prompt (for chat, the first message — typically the system prompt)."""
    if session:  # hashed: the router keeps its keys, and a client chooses this one's size
        return "session:" + hashlib.sha256(session.encode("utf-8", "replace")).hexdigest()[:32]
    if not path.startswith("/v1/") or not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # the replica says what is wrong with it
        return None
    if not isinstance(data, dict):
        return None
    head: Any = None
    if isinstance(data.get("messages"), list) and data["messages"]:
        first = data["messages"][0]
        head = [first.get("role"), str(first.get("content"))[:PREFIX_CHARS]] if isinstance(first, dict) else None
    elif isinstance(data.get("prompt"), str):
        head = data["prompt"][:PREFIX_CHARS]
    elif isinstance(data.get("prompt"), list) and data["prompt"]:
        first = data["prompt"][0]
        head = first[:PREFIX_CHARS] if isinstance(first, (str, list)) else data["prompt"][:PREFIX_CHARS]
    if head is None:
        return None
    return hashlib.sha256(json.dumps(head).encode()).hexdigest()[:32]


def error_response(exc: APIError) -> JSONResponse:
    """An APIError as the OpenAI-shaped JSON answer the single server gives."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def sse_error(exc: APIError) -> bytes:
    return f"data: {json.dumps(exc.body())}\n\ndata: [DONE]\n\n".encode()


class RayView:
    """What the gateway reads about the cluster: the replicas' metrics and how many run."""

    def __init__(self, app_name: str, deployment: str):
        self.app_name, self.deployment = app_name, deployment
        self._counted: tuple[float, int, str] = (0.0, 0, "NOT_DEPLOYED")
        self._store: Any = None

    async def texts(self, max_age_s: float = 15.0) -> dict[str, str]:
        """The replicas' metrics; raises when the store does not answer within STORE_TIMEOUT_S."""
        return {replica: text for replica, (_, text, _) in (await self.reports(max_age_s)).items()}

    async def reports(self, max_age_s: float = 15.0) -> dict[str, tuple[float, str, dict[str, Any]]]:
        """Each replica's latest push: (its age in seconds, metrics text, where it runs)."""
        if self._store is None:  # a GCS lookup (the store started again if it was lost): off the event loop
            self._store = await asyncio.to_thread(ensure_store)
        try:
            return await asyncio.wait_for(self._store.reports.remote(max_age_s), STORE_TIMEOUT_S)
        except BaseException:
            self._store = None  # looked up again next time (the store may have been restarted)
            raise

    async def replicas(self) -> tuple[int, str]:
        """Running replicas of the model deployment and the application's state (at most 1 s old)."""
        stamp, running, state = self._counted
        if time.monotonic() - stamp > 1.0:
            status = (await asyncio.wait_for(asyncio.to_thread(serve.status), STORE_TIMEOUT_S)).applications.get(
                self.app_name)
            state = ray_errors.state_name(status.status) if status is not None else "NOT_DEPLOYED"
            deployment = status.deployments.get(self.deployment) if status is not None else None
            running = int(deployment.replica_states.get("RUNNING", 0)) if deployment is not None else 0
            self._counted = (time.monotonic(), running, state)
        return running, state


class _Relay:
    """A forwarded request's hold on the gateway: released once, however the request ends (relayed
    to the end, failed, cancelled, or its response never sent because the client left). `stream`
    is the replica's answer while it may still be running (cancelled on release)."""

    def __init__(self, gateway: Gateway):
        self.gateway, self.stream, self.done = gateway, None, False
        gateway.in_flight += 1

    def release(self, *_: Any) -> None:
        if self.done:
            return
        self.done = True
        self.gateway.in_flight -= 1
        if self.stream is not None:
            try:
                self.stream.cancel()  # the replica aborts the request
            except Exception:  # noqa: BLE001 - Ray re-raises the request's own failure: nothing left to stop
                pass


class _RelayResponse(StreamingResponse):
    def __init__(self, relay: _Relay, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.relay.release()


class Gateway:
    def __init__(self, llm: Any, settings: ServeSettings, checker: KeyChecker, config: IngressConfig,
                 view: Any):
        self.llm = llm  # a streaming handle: .handle.remote(...) -> async iterator with .cancel()
        self.settings, self.config, self.view = settings, config, view
        # Keys and the per-key rate limit are enforced here, once for the whole endpoint: a limit
        # counted by each replica would let N replicas admit N times the rate.
        self.checker = checker
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst) if settings.rate_limit else None
        self.in_flight = 0  # forwarded requests between arrival and their last byte
        self.draining = False
        self.errors: collections.Counter[int] = collections.Counter()  # the ingress's own error answers
        self._stats_cache: tuple[float, dict[str, Any] | None] = (0.0, None)

    def _refuse(self, exc: APIError) -> JSONResponse:
        """An error the ingress answers itself (a replica's own errors are counted by the replica)."""
        self.errors[exc.status] += 1
        return error_response(exc)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503, /health too) and wait until those in flight have finished, at
        most `timeout_s`; returns how many were still running."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            if needs_key(path, self.settings.protect_metrics):
                check_access(self.checker, self.limiter if rate_limited(path) else None,
                             request.headers.get("authorization"))
            if path == "/metrics":
                return Response(await self._metrics(), media_type=METRICS_MEDIA_TYPE)
            if self.draining:
                if path == "/health":
                    return JSONResponse({"status": "unavailable", "reason": "the server is shutting down"},
                                        status_code=503)
                raise APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down")
            if path == "/health":
                return await self._health()
            if path == "/version" and request.method == "GET":  # static: no replica slot for it
                return JSONResponse({"version": __version__})
            if is_console(path):  # open paths: answered here, never forwarded to a replica
                if not self.config.console:
                    raise APIError(404, f"no route {path}", "not_found_error")
                if request.method != "GET":
                    raise APIError(405, f"{request.method} {path}: the console is read with GET", "invalid_request_error")
                return console_response(path, self.checker.enabled)
            if self.config.console and path == "/v1/stats" and request.method == "GET":
                return JSONResponse(await self._stats())
        except APIError as exc:
            return self._refuse(exc)
        except Exception as exc:  # noqa: BLE001 - a Ray failure reading metrics or state: a reason, not a bare 500
            return self._refuse(ray_errors.api_error(exc))
        relay = _Relay(self)
        task = asyncio.current_task()
        if task is not None:  # Ray Serve sends the response from this task: if it never does, release here
            task.add_done_callback(relay.release)
        try:
            response = await self._forward(request, path, relay)
        except APIError as exc:
            response = self._refuse(exc)
        except Exception as exc:  # noqa: BLE001 - every failure gets an OpenAI-shaped answer with a reason
            response = self._refuse(ray_errors.api_error(exc, self.config.request_timeout_s))
        except BaseException:
            relay.release()
            raise
        if not isinstance(response, _RelayResponse):
            relay.release()
        return response

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        try:
            body = None if over_limit(request.headers.get("content-length"), limit) else \
                await read_limited(request.stream(), limit)
        except ClientDisconnect:  # nobody to answer; counted as what it is, not as a server error
            raise APIError(CLIENT_CLOSED, "the client closed the connection before its body arrived",
                           code="client_closed") from None
        if body is None:
            raise body_too_large(limit)
        return body

    async def _first(self, request: Request, body: bytes, key: str | None,
                     relay: _Relay) -> tuple[Any, int, list[tuple[str, str]], list[bytes], bool]:
        """Send to a replica and wait for its status and first chunk (the whole answer, when it
        came with the status). Retried on another replica when the replica died before sending
        anything, or answered 503 itself (nothing has reached the client yet). Returns the stream,
        status, headers, the body so far and whether more follows."""
        forwarded = list(request.scope["headers"])
        query = request.scope.get("query_string", b"")
        avoid: str | None = None
        failure = "no attempt made"
        for attempt in range(self.config.max_attempts):
            if attempt:
                stats.DECISIONS["retried"] += 1
                await asyncio.sleep(self.config.retry_pause_s)
            stream = self.llm.handle.remote(request.method, request.url.path, query, forwarded, body,
                                            routing_key=key, avoid=avoid)
            relay.stream = stream
            try:
                status, headers, chunk, more, replica = await stream.__anext__()
            except ray_errors.RETRYABLE as exc:
                failure = ray_errors.api_error(exc).message
                continue
            except StopAsyncIteration:
                raise APIError(502, "the replica ended the answer before sending its status", "server_error",
                               code="replica_error") from None
            if status == 503 and attempt + 1 < self.config.max_attempts:
                avoid, failure = replica, f"replica {replica} answered 503: {chunk[:200].decode(errors='replace')}"
                continue
            first = [chunk] if chunk else []
            if more and not first:
                try:
                    first.append(await stream.__anext__())
                except StopAsyncIteration:
                    more = False
            return stream, status, headers, first, more
        raise APIError(503, f"no replica could take the request after {self.config.max_attempts} attempts; "
                            f"last: {failure}", "service_unavailable", code="no_replica")

    async def _forward(self, request: Request, path: str, relay: _Relay) -> Response:
        timeout = self.config.request_timeout_s
        deadline = time.monotonic() + timeout
        try:  # a body sent slowly counts against the request's time too
            body = await asyncio.wait_for(self._read_body(request), timeout)
        except asyncio.TimeoutError:
            raise ray_errors.api_error(asyncio.TimeoutError(), timeout) from None
        session = request.headers.get("x-session-id")
        if len(body) > PARSE_INLINE_BYTES:
            key = await asyncio.to_thread(routing_key, path, body, session)
        else:
            key = routing_key(path, body, session)
        try:
            stream, status, headers, first, more = await asyncio.wait_for(
                self._first(request, body, key, relay), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ray_errors.api_error(asyncio.TimeoutError(), timeout) from None
        headers = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
        if not more:  # the whole answer came with the status; the replica finishes on its own
            relay.stream = None
            return Response(b"".join(first), status_code=status, headers=headers)
        if "text/event-stream" not in headers.get("content-type", ""):
            try:
                chunks = first + await asyncio.wait_for(self._drain(stream), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ray_errors.api_error(asyncio.TimeoutError(), timeout) from None
            relay.stream = None
            return Response(b"".join(chunks), status_code=status, headers=headers)

        async def relayed() -> AsyncIterator[bytes]:
            for chunk in first:
                yield chunk
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        relay.stream = None
                        return
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - the status went out: end the stream with an error event
                error = ray_errors.api_error(exc, timeout)
                self.errors[error.status] += 1  # counted here: a replica that died cannot count it
                yield sse_error(error)
            finally:
                relay.release()

        return _RelayResponse(relay, relayed(), status_code=status, headers=headers)

    @staticmethod
    async def _drain(stream: Any) -> list[bytes]:
        return [chunk async for chunk in stream]

    async def _metrics(self) -> bytes:
        texts = await self.view.texts()
        return merge_metrics(texts, self._own_families(len(texts)))

    def _own_families(self, replicas: int) -> list[Any]:
        waiting = max(0, self.in_flight - replicas * self.config.per_replica) if self.config.per_replica else 0
        return ingress_families(replicas, self.config.min_replicas, stats.DECISIONS, self.in_flight, self.errors,
                                waiting, self.settings.model_name)

    async def _stats(self) -> dict[str, Any]:
        """/v1/stats for the whole endpoint: the replicas' metrics and the ingress's own, and each
        replica's line (healthy while its metrics arrive, every PUSH_S). Computed at most once per
        STATS_TTL_S whoever asks, and off the event loop (it parses every replica's text)."""
        stamp, cached = self._stats_cache
        if cached is not None and time.monotonic() - stamp < STATS_TTL_S:
            return cached
        reports = await self.view.reports()
        running, _ = await self.view.replicas()
        known = {replica: {"healthy": age <= 4 * PUSH_S + 1.0, "age_s": round(age, 3)}
                 for replica, (age, _, _) in reports.items()}
        own = self._own_families(len(reports))

        def compute() -> dict[str, Any]:
            families = merge_families({replica: text for replica, (_, text, _) in reports.items()}) + own
            return stats_from_families(families, self.settings.model_name, known) | {
                "num_replicas": running, "min_replicas": self.config.min_replicas}

        answer = await asyncio.to_thread(compute)
        self._stats_cache = (time.monotonic(), answer)
        return answer

    async def _health(self) -> Response:
        """200 while the endpoint can serve: a replica runs, or none is meant to (scaled to zero,
        the next request starts one); the replica counts in the body either way."""
        running, state = await self.view.replicas()
        try:
            reporting: int | None = len(await self.view.texts(5.0))
        except Exception:  # noqa: BLE001 - the metrics store is not the endpoint: say it did not answer
            reporting = None
        body = {"status": "ok", "application": state, "replicas": running, "replicas_reporting": reporting,
                "min_replicas": self.config.min_replicas}
        if state in FAILED_STATES:
            body |= {"status": "unavailable", "reason": f"the application is {state}"}
            return JSONResponse(body, status_code=503)
        if running == 0 and self.config.min_replicas > 0:
            body |= {"status": "unavailable", "reason": "no replica is running"}
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ingress:
    """The Ray Serve deployment around a `Gateway` (its concurrency is set by `deploy`)."""

    def __init__(self, llm: Any, settings: dict[str, Any], key_digests: list[str], config: dict[str, Any]):
        cfg = IngressConfig(**config)
        ensure_store()
        self.gateway = Gateway(llm.options(stream=True), ServeSettings(**settings), KeyChecker.from_digests(key_digests),
                               cfg, RayView(serve.get_replica_context().app_name, cfg.deployment))

    async def __call__(self, request: Request) -> Response:
        return await self.gateway(request)

    async def drain(self, timeout_s: float) -> int:
        return await self.gateway.drain(timeout_s)
