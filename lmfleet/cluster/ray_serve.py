"""Many replicas of the API server behind one endpoint, on Ray Serve.

    Ray Serve HTTP proxy ─► Ingress (reads the body, computes a routing key, retries)
                             └─► LLMReplica × N (each: AsyncLLMEngine + the same FastAPI app as
                                 `lmfleet serve`), chosen by PrefixAffinityRouter

Each replica runs the single-server app (`lmfleet.serve.app.build_app`) in process and answers
forwarded requests through it, so the OpenAI API, its validation, errors, keys and streaming are
exactly those of `lmfleet serve`. The ingress adds what one process cannot: routing by prompt
prefix, retrying a request on another replica when its replica dies before sending anything,
cluster-wide /metrics (every replica's series, labelled `replica`) and /health.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lmfleet.cluster import router as routing
from lmfleet.cluster import stats
from lmfleet.errors import ConfigError
from lmfleet.serve.auth import KeyChecker, RateLimiter, needs_key, rate_limited
from lmfleet.serve.frontend import APIError, ServeSettings, check_access, error_body
from lmfleet.serve.http_rules import body_too_large, over_limit, read_limited

APP_NAME = "lmfleet"
METRICS_STORE = "lmfleet-metrics"
NAMESPACE = "lmfleet"
MAX_ATTEMPTS = 3
METRICS_PUSH_S = 0.5  # how often each replica sends its metrics to the store the ingress reads
PREFIX_CHARS = 512  # characters (or token ids) of a prompt that make its routing key


# ---- running an ASGI app in process ---------------------------------------------------------------

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


# ---- metrics pushed by replicas, read by the ingress -----------------------------------------------

@ray.remote(num_cpus=0)
class MetricsStore:
    """The latest Prometheus text of every replica (each pushes every METRICS_PUSH_S)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str, dict[str, Any]]] = {}

    def put(self, replica: str, text: str, where: dict[str, Any]) -> None:
        """A replica's metrics text and where it runs (`pid`, `node`)."""
        self.texts[replica] = (time.time(), text, where)

    def raw(self, max_age_s: float = 15.0) -> dict[str, tuple[float, str, dict[str, Any]]]:
        now = time.time()
        return {r: entry for r, entry in self.texts.items() if now - entry[0] <= max_age_s}

    def snapshot(self, max_age_s: float = 15.0) -> dict[str, str]:
        return {r: text for r, (_, text, _) in self.raw(max_age_s).items()}


def relabel(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one exposition, each sample labelled `replica`."""
    seen_meta: set[str] = set()
    lines: list[str] = []
    for replica, text in sorted(texts.items()):
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                if line not in seen_meta:
                    seen_meta.add(line)
                    lines.append(line)
                continue
            name_part, value = line.rsplit(" ", 1)
            label = f'replica="{replica}"'
            if "{" in name_part:
                name, rest = name_part.split("{", 1)
                name_part = f"{name}{{{label},{rest}"
            else:
                name_part = f"{name_part}{{{label}}}"
            lines.append(f"{name_part} {value}")
    return "\n".join(lines) + "\n"


# ---- deployments ----------------------------------------------------------------------------------

@serve.deployment(max_ongoing_requests=64, health_check_period_s=2, health_check_timeout_s=10)
class LLMReplica:
    def __init__(self, model_dir: str, engine_kwargs: dict[str, Any], settings: dict[str, Any], threads: int,
                 wedged_after_s: float = 60.0):
        import torch

        from lmfleet.engine import AsyncLLMEngine, LLMEngine
        from lmfleet.serve.app import build_app

        torch.set_num_threads(max(1, threads))
        self.engine = AsyncLLMEngine(LLMEngine(model_dir, **engine_kwargs))
        self.app = build_app(self.engine, ServeSettings(**settings))
        self.replica = serve.get_replica_context().replica_tag
        self.where = {"pid": os.getpid(), "node": ray.util.get_node_ip_address()}
        self.wedged_after_s = wedged_after_s
        self._store = None
        self._pusher = asyncio.get_event_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        while True:
            try:
                if self._store is None:
                    self._store = ray.get_actor(METRICS_STORE, namespace=NAMESPACE)
                await self._store.put.remote(self.replica, self.app.state.front.metrics.render().decode(),
                                             self.where)
            except Exception:  # noqa: BLE001 - metrics must never take a replica down
                self._store = None
            await asyncio.sleep(METRICS_PUSH_S)

    async def handle(self, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes,
                     routing_key: str | None = None) -> AsyncIterator[Any]:
        """One forwarded HTTP request: see `asgi_call` for what it yields."""
        async for item in asgi_call(self.app, method, path, query, headers, body):
            yield item

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose check fails: the engine loop died, or it holds
        requests and has not finished a step for `wedged_after_s`."""
        if not self.engine.is_running:
            raise RuntimeError(f"engine loop is not running: {self.engine.error!r}")
        idle_for = time.monotonic() - self.engine.last_step_time
        if self.engine.num_unfinished and idle_for > self.wedged_after_s:
            raise RuntimeError(f"engine loop wedged: no step for {idle_for:.0f} s with requests waiting")


def routing_key(path: str, body: bytes, session: str | None) -> str | None:
    """What makes two requests likely to share KV-cache blocks: the session, else the start of the
    prompt (for chat, the first message — typically the system prompt)."""
    if session:
        return "session:" + session
    if not path.startswith("/v1/") or not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
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


def _error(exc: APIError) -> JSONResponse:
    """An APIError as the OpenAI-shaped JSON answer the single server gives."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse_error(message: str, code: str = "replica_failed") -> bytes:
    return f"data: {json.dumps(error_body(message, 'service_unavailable', None, code))}\n\n" \
           "data: [DONE]\n\n".encode()


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class Ingress:
    def __init__(self, llm: Any, settings: dict[str, Any], max_attempts: int = MAX_ATTEMPTS,
                 request_timeout_s: float = 600.0):
        self.llm = llm.options(stream=True)
        self.settings = ServeSettings(**settings)
        # Keys and the per-key rate limit are enforced here, once for the whole endpoint: a limit
        # counted by each replica would let N replicas admit N times the rate.
        self.checker = KeyChecker(self.settings.api_keys)
        self.limiter = RateLimiter(self.settings.rate_limit, self.settings.rate_burst) \
            if self.settings.rate_limit else None
        self.max_attempts = max_attempts
        self.request_timeout_s = request_timeout_s
        self.in_flight = 0  # requests between arrival and their last byte
        self.draining = False

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503, /health too) and wait until those in flight have finished, at
        most `timeout_s`; returns how many were still running."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None when it exceeds max_body_bytes (checked before it is all read)."""
        limit = self.settings.max_body_bytes
        if over_limit(request.headers.get("content-length"), limit):
            return None
        return await read_limited(request.stream(), limit)

    async def _first(self, request: Request, body: bytes, key: str | None,
                     current: list[Any]) -> tuple[Any, int, list[tuple[str, str]], list[bytes], bool]:
        """Send to a replica and wait for its status and first chunk (the whole answer, when it
        came with the status); retried on another replica when the replica dies before sending
        anything (nothing reached the client yet). Returns the stream, status, headers, the body
        so far and whether more follows."""
        forwarded = list(request.scope["headers"])
        last_error: Exception | None = None
        for _ in range(self.max_attempts):
            stream = self.llm.handle.remote(request.method, request.url.path, request.scope.get("query_string", b""),
                                            forwarded, body, routing_key=key)
            current[:] = [stream]  # so that a timeout can cancel it
            try:
                status, headers, chunk, more = await stream.__anext__()
                first = [chunk] if chunk else []
                if more and not first:
                    try:
                        first.append(await stream.__anext__())
                    except StopAsyncIteration:
                        more = False
                return stream, status, headers, first, more
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                last_error = exc
                stats.DECISIONS["retried"] += 1
                await asyncio.sleep(0.2)
        raise RuntimeError(f"no replica could take the request after {self.max_attempts} attempts: {last_error}")

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if needs_key(path, self.settings.protect_metrics):
            try:
                check_access(self.checker, self.limiter if rate_limited(path) else None,
                             request.headers.get("authorization"))
            except APIError as exc:
                return _error(exc)
        if path == "/metrics":
            return Response(await self._metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")
        if self.draining:
            if path == "/health":
                return JSONResponse({"status": "unavailable", "reason": "the server is shutting down"}, status_code=503)
            return _error(APIError(503, "the server is shutting down", "service_unavailable", code="shutting_down"))
        if path == "/health":
            return await self._health()
        self.in_flight += 1
        streaming = False
        try:
            response = await self._forward(request, path)
            if isinstance(response, StreamingResponse):
                streaming = True  # the relay counts the request done after its last chunk
            return response
        finally:
            if not streaming:
                self.in_flight -= 1

    async def _forward(self, request: Request, path: str) -> Response:
        body = await self._read_body(request)
        if body is None:
            return _error(body_too_large(self.settings.max_body_bytes))
        key = routing_key(path, body, request.headers.get("x-session-id"))
        deadline = time.monotonic() + self.request_timeout_s

        def timed_out() -> JSONResponse:
            return _error(APIError(504, f"the request took longer than {self.request_timeout_s:g} s",
                                   "timeout_error", code="timeout"))

        current: list[Any] = []
        try:
            stream, status, headers, first, more = await asyncio.wait_for(
                self._first(request, body, key, current), self.request_timeout_s)
        except RuntimeError as exc:
            return _error(APIError(503, str(exc), "service_unavailable", code="no_replica"))
        except asyncio.TimeoutError:
            for pending in current:
                pending.cancel()  # the replica aborts the request and frees its blocks
            return timed_out()
        headers = {k: v for k, v in headers if k.lower() not in ("content-length", "transfer-encoding")}
        if not more:  # the whole answer came with the status
            return Response(b"".join(first), status_code=status, headers=headers)
        if "text/event-stream" not in headers.get("content-type", ""):
            try:
                chunks = first + await asyncio.wait_for(self._drain(stream), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                stream.cancel()
                return timed_out()
            return Response(b"".join(chunks), status_code=status, headers=headers)

        async def relay() -> AsyncIterator[bytes]:
            for chunk in first:
                yield chunk
            try:
                while True:
                    try:
                        chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
                    except StopAsyncIteration:
                        return
                    yield chunk
            except asyncio.TimeoutError:
                yield _sse_error(f"the request took longer than {self.request_timeout_s:g} s", "timeout")
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                yield _sse_error(f"the replica serving this stream failed: {type(exc).__name__}")
            finally:
                stream.cancel()
                self.in_flight -= 1

        return StreamingResponse(relay(), status_code=status, headers=headers)

    @staticmethod
    async def _drain(stream: Any) -> list[bytes]:
        return [chunk async for chunk in stream]

    async def _metrics(self) -> str:
        texts: dict[str, str] = {}
        try:
            store = ray.get_actor(METRICS_STORE, namespace=NAMESPACE)
            texts = await store.snapshot.remote()
        except ValueError:
            pass
        lines = [relabel(texts),
                 "# HELP lmfleet:num_replicas Replicas whose metrics arrived in the last 15 s.",
                 "# TYPE lmfleet:num_replicas gauge", f"lmfleet:num_replicas {len(texts)}",
                 "# HELP lmfleet:router_decisions_total Routing decisions of this ingress.",
                 "# TYPE lmfleet:router_decisions_total counter"]
        lines += [f'lmfleet:router_decisions_total{{decision="{k}"}} {v}' for k, v in sorted(stats.DECISIONS.items())]
        lines += ["# HELP lmfleet:router_prefix_hits_total Requests sent to the replica holding their prefix.",
                  "# TYPE lmfleet:router_prefix_hits_total counter",
                  f"lmfleet:router_prefix_hits_total {stats.DECISIONS['prefix_hit']}",
                  "# HELP lmfleet:router_retries_total Requests retried on another replica.",
                  "# TYPE lmfleet:router_retries_total counter",
                  f"lmfleet:router_retries_total {stats.DECISIONS['retried']}"]
        return "\n".join(lines) + "\n"

    async def _health(self) -> Response:
        try:
            store = ray.get_actor(METRICS_STORE, namespace=NAMESPACE)
            live = len(await store.snapshot.remote(5.0))
        except ValueError:
            live = 0
        status = serve.status().applications.get(APP_NAME)
        state = status.status if status is not None else "NOT_DEPLOYED"
        healthy = live > 0 and state == "RUNNING"
        return JSONResponse({"status": "ok" if healthy else "unavailable", "application": str(state),
                             "replicas_reporting": live}, status_code=200 if healthy else 503)


# ---- deploying ------------------------------------------------------------------------------------

def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--autoscale {text!r} should be MIN:MAX, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise ConfigError(f"--autoscale {text!r} needs 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def check_resources(replicas_needed: int, cpus_per_replica: float, gpus_per_replica: float) -> list[str]:
    """Refuse a deployment the cluster cannot place (Ray would wait forever without an error);
    return warnings for an autoscaling ceiling it cannot reach."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if replicas_needed * cpus_per_replica > cpus:
        raise ConfigError(f"{replicas_needed} replica(s) x {cpus_per_replica} CPU need "
                          f"{replicas_needed * cpus_per_replica:g} CPUs; the Ray cluster has {cpus:g}. "
                          "Lower --cpus-per-replica or add nodes")
    if replicas_needed * gpus_per_replica > gpus:
        raise ConfigError(f"{replicas_needed} replica(s) x {gpus_per_replica} GPU need "
                          f"{replicas_needed * gpus_per_replica:g} GPUs; the Ray cluster has {gpus:g}")
    return []


def deploy(model_dir: str, settings: ServeSettings, engine_kwargs: dict[str, Any], *, replicas: int | None = None,
           autoscale: tuple[int, int] | None = None, target_ongoing_requests: float = 8.0,
           upscale_delay_s: float = 3.0, downscale_delay_s: float = 30.0, cpus_per_replica: float = 1.0,
           gpus_per_replica: float = 0.0, host: str = "127.0.0.1", port: int = 8000, router: str = "prefix",
           imbalance_threshold: int = 4, request_timeout_s: float = 600.0, ray_address: str | None = None,
           app_name: str = APP_NAME) -> list[str]:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the app; returns
    warnings (e.g. an autoscaling ceiling above the cluster's resources)."""
    if (replicas is None) == (autoscale is None):
        raise ConfigError("give --replicas N or --autoscale MIN:MAX")
    if replicas is not None and replicas < 1:
        raise ConfigError(f"--replicas {replicas} must be >= 1")
    if router not in ("prefix", "pow2"):
        raise ConfigError(f"router {router!r}: choose prefix or pow2")
    if request_timeout_s <= 0:
        raise ConfigError(f"--request-timeout {request_timeout_s} must be > 0 seconds")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, namespace=NAMESPACE,
                 configure_logging=False)
    warnings: list[str] = []
    needed = replicas if replicas is not None else max(1, autoscale[0])
    check_resources(needed, cpus_per_replica, gpus_per_replica)
    if autoscale is not None:
        total_cpus = ray.cluster_resources().get("CPU", 0.0)
        if autoscale[1] * cpus_per_replica > total_cpus:
            warnings.append(f"--autoscale max {autoscale[1]} x {cpus_per_replica} CPU exceeds the cluster's "
                            f"{total_cpus:g} CPUs: scale-up stops at {int(total_cpus // cpus_per_replica)} replicas "
                            "until nodes are added (`lmfleet status` shows replicas pending)")
    try:  # a fresh store: series of replicas from an earlier deployment must not linger
        ray.kill(ray.get_actor(METRICS_STORE, namespace=NAMESPACE))
    except ValueError:
        pass
    MetricsStore.options(name=METRICS_STORE, namespace=NAMESPACE, lifetime="detached").remote()
    serve.start(http_options={"host": host, "port": port})
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}}
    if router == "prefix":
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=routing.PrefixAffinityRouter,
            request_router_kwargs={"imbalance_threshold": imbalance_threshold})
    if autoscale is not None:
        options["autoscaling_config"] = {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                         "initial_replicas": max(1, autoscale[0]),
                                         "target_ongoing_requests": target_ongoing_requests,
                                         "upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s}
    else:
        options["num_replicas"] = replicas
    # The ingress enforces the rate limit for the whole endpoint; replicas still check keys.
    replica_settings = asdict(settings) | {"rate_limit": None, "rate_burst": None}
    llm = LLMReplica.options(**options).bind(str(model_dir), engine_kwargs, replica_settings,
                                             max(1, int(cpus_per_replica)))
    serve.run(Ingress.bind(llm, asdict(settings), MAX_ATTEMPTS, request_timeout_s), name=app_name, route_prefix="/")
    return warnings


def drain(timeout_s: float, app_name: str = APP_NAME) -> int:
    """Stop taking requests at the endpoint and let those in flight finish (at most `timeout_s`);
    returns how many were cut short."""
    return serve.get_app_handle(app_name).drain.remote(timeout_s).result(timeout_s=timeout_s + 30)


def replica_status(app_name: str = APP_NAME) -> dict[str, Any]:
    """Replica counts by state and the application's status, from Ray Serve."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {"application": "NOT_DEPLOYED", "deployments": {}}
    return {"application": str(app.status), "deployments": {
        name: {"status": str(d.status), "replicas": {str(k): v for k, v in d.replica_states.items()}}
        for name, d in app.deployments.items()}}


def _sample(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def cluster_status(ray_address: str = "auto", app_name: str = APP_NAME) -> dict[str, Any]:
    """Application and replica states from Ray Serve, and each replica's load from its last metrics."""
    if not ray.is_initialized():
        try:
            ray.init(address=ray_address, namespace=NAMESPACE, log_to_driver=False, configure_logging=False)
        except ConnectionError as exc:
            raise ConfigError(f"no Ray cluster at {ray_address!r}: {exc}") from None
    result = replica_status(app_name)
    replicas = []
    try:
        store = ray.get_actor(METRICS_STORE, namespace=NAMESPACE)
        now = time.time()
        for replica, (stamp, text, where) in sorted(ray.get(store.raw.remote()).items()):
            replicas.append({"replica": replica, "pid": where["pid"], "node": where["node"], "age_s": now - stamp,
                             "running": _sample(text, "lmfleet:num_requests_running"),
                             "waiting": _sample(text, "lmfleet:num_requests_waiting"),
                             "kv_cache_usage": _sample(text, "lmfleet:kv_cache_usage_perc"),
                             "generation_tokens": _sample(text, "lmfleet:generation_tokens_total")})
    except ValueError:
        pass
    result["replicas"] = replicas
    return result


def shutdown() -> None:
    """Stop Serve, the metrics store and (when this process started it) Ray."""
    try:
        serve.shutdown()
    finally:
        try:
            ray.kill(ray.get_actor(METRICS_STORE, namespace=NAMESPACE))
        except ValueError:
            pass
        ray.shutdown()
