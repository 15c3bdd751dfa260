"""The latest metrics of every replica, in one small actor: replicas push, the ingress and
`lmfleet status` read."""

from __future__ import annotations

import time
from typing import Any

import ray

METRICS_STORE = "lmfleet-metrics"
NAMESPACE = "lmfleet"
PUSH_S = 0.5  # how often each replica sends its metrics
FORGET_S = 300.0  # a replica silent this long is dropped from the store


@ray.remote(num_cpus=0)
class MetricsStore:
    """The latest Prometheus text of every replica (each pushes every PUSH_S)."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str, dict[str, Any]]] = {}

    def put(self, replica: str, text: str, where: dict[str, Any]) -> None:
        """A replica's metrics text and where it runs (`pid`, `node`); replicas silent for
        FORGET_S are forgotten (replaced replicas must not pile up)."""
        now = time.time()
        self.texts[replica] = (now, text, where)
        for gone in [r for r, entry in self.texts.items() if now - entry[0] > FORGET_S]:
            del self.texts[gone]

    def raw(self, max_age_s: float = 15.0) -> dict[str, tuple[float, str, dict[str, Any]]]:
        now = time.time()
        return {r: entry for r, entry in self.texts.items() if now - entry[0] <= max_age_s}

    def reports(self, max_age_s: float = 15.0) -> dict[str, tuple[float, str, dict[str, Any]]]:
        """Each replica's (seconds since its last push, text, where): the age on this actor's clock,
        so that the caller's clock, on another node, does not matter."""
        now = time.time()
        return {r: (now - stamp, text, where) for r, (stamp, text, where) in self.raw(max_age_s).items()}

    def snapshot(self, max_age_s: float = 15.0) -> dict[str, str]:
        return {r: text for r, (_, text, _) in self.raw(max_age_s).items()}


def store_handle() -> Any | None:
    """The running store, or None."""
    try:
        return ray.get_actor(METRICS_STORE, namespace=NAMESPACE)
    except ValueError:
        return None


def _store_options() -> dict[str, Any]:
    # On the head node: an autoscaler removes worker nodes it finds idle, and a 0-CPU actor does not
    # keep its node busy, so the store would go with its node.
    return {"name": METRICS_STORE, "namespace": NAMESPACE, "lifetime": "detached",
            "resources": {"node:__internal_head__": 0.001}}


def start_store() -> None:
    """A fresh store: series of replicas from an earlier deployment must not linger."""
    stop_store()
    MetricsStore.options(**_store_options()).remote()


def ensure_store() -> Any:
    """The store, started if none runs (an application deployed from a Serve config, e.g. by a
    KubeRay RayService, has no `lmfleet serve` process to start it, and a lost store comes back)."""
    return MetricsStore.options(**_store_options(), get_if_exists=True).remote()


def stop_store() -> None:
    store = store_handle()
    if store is not None:
        ray.kill(store)
