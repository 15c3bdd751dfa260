"""Putting the model on Ray Serve and taking it down: the cluster settings, the deployments'
options (concurrency, queue, resources, router, graceful shutdown), deploy, drain, shutdown.

    Ray Serve HTTP proxy ─► Ingress (reads the body, computes a routing key, retries)
                             └─► LLMReplica × N (each: AsyncLLMEngine + the same FastAPI app as
                                 `lmfleet serve`), chosen by the request router
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from lmfleet.cluster import ray_errors
from lmfleet.cluster import router as routing
from lmfleet.cluster.ingress import Ingress, IngressConfig
from lmfleet.cluster.join import connect
from lmfleet.cluster.metrics_store import start_store, stop_store
from lmfleet.cluster.replica import LLMReplica
from lmfleet.errors import ConfigError
from lmfleet.serve.auth import KeyChecker
from lmfleet.serve.frontend import ServeSettings

APP_NAME = "lmfleet"
LMFLEET_APPS = ("lmfleet", "lmfleet-recsys")  # the language models' and the recommender's
DEFAULT_MAX_NUM_SEQS = 64  # the engine's default, when engine_kwargs leave it out
PROBE_SLOTS = 64  # ingress slots beyond every replica's and the queue's, for /health and /metrics


class AppAlreadyRunning(ConfigError):
    """The Ray cluster already serves an application of that name: it is left alone."""


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--autoscale {text!r} should be MIN:MAX, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise ConfigError(f"--autoscale {text!r} needs 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


@dataclass
class ClusterConfig:
    """How the model runs on Ray Serve (the `lmfleet serve --replicas/--autoscale` options)."""

    replicas: int | None = None
    autoscale: tuple[int, int] | None = None
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    host: str = "127.0.0.1"
    port: int = 8000
    router: str = "prefix"
    imbalance_threshold: int = 4
    request_timeout_s: float = 600.0
    graceful_shutdown_timeout_s: float = 30.0  # a replica stopped (scale-down) finishes its requests this long
    max_attempts: int = 3
    ray_address: str | None = None
    app_name: str = APP_NAME

    def __post_init__(self) -> None:
        if (self.replicas is None) == (self.autoscale is None):
            raise ConfigError("give --replicas N or --autoscale MIN:MAX")
        if self.replicas is not None and self.replicas < 1:
            raise ConfigError(f"--replicas {self.replicas} must be >= 1")
        if self.router not in ("prefix", "pow2"):
            raise ConfigError(f"router {self.router!r}: choose prefix or pow2")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"--request-timeout {self.request_timeout_s} must be > 0 seconds")
        if self.graceful_shutdown_timeout_s < 0:
            raise ConfigError(f"--graceful-shutdown-timeout {self.graceful_shutdown_timeout_s} must be >= 0 seconds")
        if self.max_attempts < 1:
            raise ConfigError(f"max_attempts {self.max_attempts} must be >= 1")

    @property
    def min_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.autoscale[0]

    @property
    def max_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.autoscale[1]


def llm_options(config: ClusterConfig, max_num_seqs: int, max_queued_requests: int) -> dict[str, Any]:
    """The LLMReplica deployment's options: a replica takes as many requests as its engine decodes
    together; the rest wait at the ingress, at most `max_queued_requests`, then get 429."""
    if max_queued_requests < 1:
        raise ConfigError(f"--max-queued-requests {max_queued_requests}: on Ray Serve it must be >= 1 "
                          "(requests wait at the ingress until a replica has room)")
    router = routing.PrefixAffinityRouter if config.router == "prefix" else routing.AvoidingPowerOfTwoRouter
    kwargs = {"imbalance_threshold": config.imbalance_threshold} if config.router == "prefix" else {}
    return replica_options(config, max_num_seqs, max_queued_requests, router, kwargs)


def ingress_options(config: ClusterConfig, max_num_seqs: int, max_queued_requests: int) -> dict[str, Any]:
    """The ingress holds every request from arrival to last byte: room for all that the replicas run
    and queue, and for probes, so that it is the ingress (with a 429) that refuses the excess."""
    return {"max_ongoing_requests": config.max_replicas * max_num_seqs + max_queued_requests + PROBE_SLOTS}


def check_resources(replicas_needed: int, cpus_per_replica: float, gpus_per_replica: float) -> None:
    """Refuse a deployment the cluster cannot place (Ray would wait forever without an error)."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if replicas_needed * cpus_per_replica > cpus:
        raise ConfigError(f"{replicas_needed} replica(s) x {cpus_per_replica} CPU need "
                          f"{replicas_needed * cpus_per_replica:g} CPUs; the Ray cluster has {cpus:g}. "
                          "Lower --cpus-per-replica or add nodes")
    if replicas_needed * gpus_per_replica > gpus:
        raise ConfigError(f"{replicas_needed} replica(s) x {gpus_per_replica} GPU need "
                          f"{replicas_needed * gpus_per_replica:g} GPUs; the Ray cluster has {gpus:g}")


def deploy(model_dir: str, settings: ServeSettings, engine_kwargs: dict[str, Any], config: ClusterConfig) -> list[str]:
    """Start (or join) Ray, start Serve's HTTP proxy on host:port and deploy the app; returns
    warnings (e.g. an autoscaling ceiling above the cluster's resources)."""
    config = per_replica_resources(config, engine_kwargs)
    app = llm_application(model_dir, settings, engine_kwargs, config)  # refuses bad options before Ray starts
    warnings = start_cluster(config)
    run_application(app, config.app_name)
    return warnings


def per_replica_resources(config: ClusterConfig, engine_kwargs: dict[str, Any]) -> ClusterConfig:
    """A tensor-parallel replica is rank 0 plus tp - 1 worker processes beside it: it reserves for all."""
    tp = int(engine_kwargs.get("tensor_parallel_size") or 1)
    if tp == 1:
        return config
    return replace(config, cpus_per_replica=config.cpus_per_replica * tp, gpus_per_replica=config.gpus_per_replica * tp)


def llm_application(model_dir: str, settings: ServeSettings, engine_kwargs: dict[str, Any],
                    config: ClusterConfig) -> Any:
    """The application graph (not yet running): LLMReplica x N behind the ingress. `config` is
    already `per_replica_resources`'s."""
    max_num_seqs = int(engine_kwargs.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)
    llm = llm_options(config, max_num_seqs, settings.max_queued_requests)
    # Ray keeps deployment arguments where anyone on the cluster can read them: keys go as digests.
    digests = KeyChecker(settings.api_keys).digests()
    # The ingress enforces the rate limit for the whole endpoint; replicas still check keys.
    replica_settings = asdict(replace(settings, api_keys=[], rate_limit=None, rate_burst=None))
    replicas = LLMReplica.options(**llm).bind(str(model_dir), engine_kwargs, replica_settings, digests,
                                              max(1, int(config.cpus_per_replica)))
    return behind_ingress(replicas, config, settings, max_num_seqs)


def start_cluster(config: ClusterConfig) -> list[str]:
    """Connect to (or start) Ray, refuse an application name already served and replicas the
    cluster cannot place, start the metrics store and Serve's HTTP proxy on host:port; returns
    warnings (e.g. an autoscaling ceiling above the cluster's resources)."""
    connect(config.ray_address)
    running = serve.status().applications  # empty when Serve is not running
    existing = running.get(config.app_name)
    if existing is not None:
        raise AppAlreadyRunning(f"the Ray cluster already serves an application named {config.app_name!r} "
                                f"({ray_errors.state_name(existing.status)}), e.g. another `lmfleet serve`; "
                                "stop that one first (it is left running)")
    # Another lmfleet application holds the route "/" and the metrics store: starting would break it.
    other = next((name for name in LMFLEET_APPS if name != config.app_name and name in running), None)
    if other is not None:
        raise AppAlreadyRunning(f"the Ray cluster already serves the lmfleet application {other!r} on the same "
                                "endpoint; one lmfleet application per Ray cluster (it is left running)")
    check_resources(max(1, config.min_replicas), config.cpus_per_replica, config.gpus_per_replica)
    warnings: list[str] = []
    if config.autoscale is not None:
        total_cpus = ray.cluster_resources().get("CPU", 0.0)
        if config.max_replicas * config.cpus_per_replica > total_cpus:
            warnings.append(f"--autoscale max {config.max_replicas} x {config.cpus_per_replica} CPU exceeds the "
                            f"cluster's {total_cpus:g} CPUs: scale-up stops at "
                            f"{int(total_cpus // config.cpus_per_replica)} replicas until nodes are added "
                            "(`lmfleet status` shows replicas pending)")
    start_store()
    serve.start(http_options={"host": config.host, "port": config.port})
    return warnings


def behind_ingress(replicas: Any, config: ClusterConfig, settings: ServeSettings, per_replica: int,
                   deployment: str = "LLMReplica", console: bool = True) -> Any:
    """`replicas` (a bound deployment) behind the one ingress (keys, body limit, rate, retries,
    cluster /metrics and /health, and with `console` the language models' /ui and /v1/stats): the
    application to run, under any name."""
    digests = KeyChecker(settings.api_keys).digests()
    shared = asdict(replace(settings, api_keys=[]))
    ingress = IngressConfig(config.max_attempts, config.request_timeout_s, config.min_replicas,
                            per_replica=per_replica, console=console, deployment=deployment)
    return Ingress.options(**ingress_options(config, per_replica, settings.max_queued_requests)).bind(
        replicas, shared, digests, asdict(ingress))


def run_application(app: Any, app_name: str) -> None:
    """Run the application at route "/" and wait until it is up; a failed deployment is a
    ConfigError carrying Ray's first and last lines."""
    try:
        serve.run(app, name=app_name, route_prefix="/")
    except RuntimeError as exc:  # Ray's "Deploying application ... failed" with a replica's traceback
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), "")
        raise ConfigError(f"the deployment failed: {lines[0] if lines else exc!r}"
                          + (f" ... {last}" if last and len(lines) > 1 else "")) from None


def replica_options(config: ClusterConfig, max_ongoing: int, max_queued: int, router: type,
                    router_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A replica deployment's options: resources, concurrency, queue, request router, graceful
    shutdown, and its replica count or autoscaling."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
        "request_router_config": RequestRouterConfig(request_router_class=router,
                                                     request_router_kwargs=router_kwargs or {})}
    if config.autoscale is not None:
        options["autoscaling_config"] = {
            "min_replicas": config.autoscale[0], "max_replicas": config.autoscale[1],
            "initial_replicas": max(1, config.autoscale[0]), "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s, "downscale_delay_s": config.downscale_delay_s}
    else:
        options["num_replicas"] = config.replicas
    return options


def drain(timeout_s: float, app_name: str = APP_NAME) -> int:
    """Stop taking requests at the endpoint and let those in flight finish (at most `timeout_s`);
    returns how many were cut short."""
    return serve.get_app_handle(app_name).drain.remote(timeout_s).result(timeout_s=timeout_s + 30)


def shutdown(app_name: str = APP_NAME) -> None:
    """Take the application down: Serve too when nothing else runs on it, the metrics store, and
    this process's connection to Ray (Ray itself stops when this process started it)."""
    if not ray.is_initialized():
        return
    try:
        others = set(serve.status().applications) - {app_name}  # empty when Serve is not running
        if others:  # a shared cluster's other applications keep running
            serve.delete(app_name)
        else:
            serve.shutdown()
    finally:
        try:
            stop_store()
        finally:
            ray.shutdown()


def disconnect() -> None:
    """Only this process's connection to Ray: what runs on the cluster stays."""
    ray.shutdown()
