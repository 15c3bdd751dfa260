"""What a client is told when Ray, not the model, fails a request: every Ray and Ray Serve error as
an OpenAI-shaped answer with a status, a code and a one-line reason (never Ray Serve's bare 500),
and which of them may be retried on another replica."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from ray import exceptions as ray_exc
from ray.serve import exceptions as serve_exc

from lmfleet.serve.frontend import APIError

# The replica went away before answering: the request may run again elsewhere (the client has
# received nothing yet).
RETRYABLE = (ray_exc.RayActorError, serve_exc.ReplicaUnavailableError)


def _reason(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:limit]}" if first else type(exc).__name__


def retry_after(exc: serve_exc.BackPressureError) -> str:
    """Seconds (whole, at least 1) a client should wait after a full queue."""
    seconds = exc.retry_after_s if isinstance(exc.retry_after_s, (int, float)) else None
    return str(max(1, math.ceil(seconds))) if seconds else "1"


def api_error(exc: BaseException, timeout_s: float | None = None) -> APIError:
    """The answer for a request that failed with `exc` on its way to or in a replica."""
    if isinstance(exc, ray_exc.RayTaskError) and not isinstance(exc, serve_exc.RayServeException):
        cause = exc.cause if isinstance(exc.cause, BaseException) else None
        if cause is not None and isinstance(cause, (ray_exc.RayError, serve_exc.RayServeException)):
            return api_error(cause, timeout_s)
        return APIError(502, f"the replica failed while handling the request: {_reason(cause or exc)}",
                        "server_error", code="replica_error")
    if isinstance(exc, serve_exc.BackPressureError):
        limit = exc.args[1] if len(exc.args) > 1 else "?"
        return APIError(429, f"the request queue is full ({limit} waiting for a replica)", code="queue_full",
                        headers={"Retry-After": retry_after(exc)})  # as one server answers it
    if isinstance(exc, serve_exc.DeploymentUnavailableError):
        return APIError(503, f"the model's replicas are unavailable: {exc.message}", "service_unavailable",
                        code="no_replica")
    if isinstance(exc, RETRYABLE):
        return APIError(503, f"the replica serving the request failed: {_reason(exc)}", "service_unavailable",
                        code="replica_failed")
    if isinstance(exc, (asyncio.TimeoutError, ray_exc.GetTimeoutError)):
        took = f"longer than {timeout_s:g} s" if timeout_s is not None else "too long"
        return APIError(504, f"the request took {took}", "timeout_error", code="timeout")
    if isinstance(exc, ray_exc.TaskCancelledError):
        return APIError(503, f"Ray cancelled the request: {_reason(exc)}", "service_unavailable", code="cancelled")
    if isinstance(exc, (ray_exc.RayError, serve_exc.RayServeException)):
        return APIError(503, f"the cluster could not serve the request: {_reason(exc)}", "service_unavailable",
                        code="cluster_error")
    return APIError(500, f"internal error in the cluster ingress: {_reason(exc)}", "server_error",
                    code="internal_error")


def state_name(state: Any) -> str:
    """A Ray Serve status enum as its bare name (`RUNNING`, not `ReplicaState.RUNNING`)."""
    return str(getattr(state, "value", state))
