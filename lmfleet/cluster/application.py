"""The language-model application as a Ray Serve application builder, for deploying from a Serve
config file instead of the `lmfleet serve --replicas` process: a KubeRay `RayService`'s
`serveConfigV2`, or `serve deploy` / `serve run` on an existing cluster.

    applications:
      - name: lmfleet
        route_prefix: /
        import_path: lmfleet.cluster.application:build
        args: {model_dir: /models/model, replicas: 2, api_key_file: /secrets/lmfleet/keys}

The arguments are the `lmfleet serve` options of the same names (dashes as underscores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmfleet.cluster.deploy import ClusterConfig, llm_application, parse_autoscale, per_replica_resources
from lmfleet.errors import ConfigError
from lmfleet.serve.frontend import ServeSettings

# The args that are the engine's options (`serve.server.engine_options` maps them).
ENGINE_ARGS = {"max_num_seqs", "max_num_batched_tokens", "dtype", "device", "max_model_len", "no_prefix_caching",
               "enforce_eager", "gpu_memory_utilization", "linear_method", "tensor_parallel_size", "kv_cache_memory"}


class ApplicationArgs(BaseModel):
    """What a Serve config's `args` may set; anything else, a value of another type, a non-finite
    number or one out of its range is refused by name."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model_dir: str = Field(min_length=1)
    served_model_name: str | None = Field(None, min_length=1, max_length=256)
    replicas: int | None = Field(None, ge=1, le=1024)
    autoscale: str | None = Field(None, pattern=r"^\d+:\d+$")  # MIN:MAX
    target_ongoing_requests: float = Field(8.0, gt=0, le=1e6)
    upscale_delay: float = Field(3.0, ge=0, le=86400)
    downscale_delay: float = Field(30.0, ge=0, le=86400)
    cpus_per_replica: float = Field(1.0, gt=0, le=1024)
    gpus_per_replica: float = Field(0.0, ge=0, le=64)
    router: Literal["prefix", "pow2"] = "prefix"
    request_timeout: float = Field(600.0, gt=0, le=86400)
    graceful_shutdown_timeout: float = Field(30.0, ge=0, le=3600)
    # Read where the application is built (mount the Secret on every pod); LMFLEET_API_KEY there too.
    api_key_file: str | None = None
    allow_unauthenticated: bool = False  # serve without any key: only behind something that checks
    max_num_seqs: int = Field(64, ge=1, le=65536)
    max_num_batched_tokens: int = Field(2048, ge=1, le=1 << 24)
    max_queued_requests: int = Field(512, ge=1, le=1 << 20)
    kv_cache_memory: str | None = None
    max_model_len: int | None = Field(None, ge=1, le=1 << 24)
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")  # checked on the replica's node
    no_prefix_caching: bool = False
    enforce_eager: bool = False
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    linear_method: str = "auto"
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    rate_limit: float | None = Field(None, gt=0, le=1e6)
    rate_burst: int | None = Field(None, ge=1, le=1 << 20)
    max_body_bytes: str = "4MiB"
    protect_metrics: bool = False
    enable_priority: bool = False
    enable_docs: bool = False


def parse_args(args: dict[str, Any]) -> ApplicationArgs:
    try:
        return ApplicationArgs.model_validate(args)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'args'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"lmfleet application args: {problems}") from None


def build(args: dict[str, Any]) -> Any:
    """The Serve application (LLMReplica x N behind the ingress) the args describe, checked before
    anything is deployed: the model directory, the key file, the sizes."""
    from lmfleet.engine.linear import check_linear_method
    from lmfleet.serve.auth import load_api_keys
    from lmfleet.serve.server import check_inputs, engine_options, parse_size

    a = parse_args(args)
    config = ClusterConfig(a.replicas, parse_autoscale(a.autoscale) if a.autoscale is not None else None,
                           a.target_ongoing_requests, a.upscale_delay, a.downscale_delay, a.cpus_per_replica,
                           a.gpus_per_replica, router=a.router, request_timeout_s=a.request_timeout,
                           graceful_shutdown_timeout_s=a.graceful_shutdown_timeout)
    if a.rate_burst is not None and a.rate_limit is None:
        raise ConfigError("lmfleet application args: rate_burst needs rate_limit")
    check_linear_method(a.linear_method)
    check_inputs(a.model_dir, None, None)
    keys = load_api_keys([], a.api_key_file)
    if not keys and not a.allow_unauthenticated:
        raise ConfigError("lmfleet application args: no API key (give api_key_file, or LMFLEET_API_KEY where the "
                          "application is built); set allow_unauthenticated: true to serve without keys")
    settings = ServeSettings(a.served_model_name or Path(a.model_dir).resolve().name, keys, a.max_queued_requests,
                             parse_size(a.max_body_bytes, "max_body_bytes"), a.rate_limit, a.rate_burst,
                             a.protect_metrics, enable_docs=a.enable_docs, enable_priority=a.enable_priority)
    engine_kwargs = engine_options(**a.model_dump(include=ENGINE_ARGS), kv_cache_flag="kv_cache_memory")
    return llm_application(a.model_dir, settings, engine_kwargs, per_replica_resources(config, engine_kwargs))
