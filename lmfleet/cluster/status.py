"""`lmfleet status`: the application's and replicas' states from Ray Serve, and each replica's load,
process and node from the metrics it last pushed (no Ray dashboard needed). It reports the lmfleet
application the cluster runs: the language models' or the recommender's (one per cluster)."""

from __future__ import annotations

import time
from typing import Any

import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from lmfleet.cluster.deploy import APP_NAME, LMFLEET_APPS
from lmfleet.cluster.join import connect
from lmfleet.cluster.metrics_store import store_handle
from lmfleet.cluster.ray_errors import state_name


def replica_status(app_name: str = APP_NAME) -> dict[str, Any]:
    """Replica counts by state and the application's status, from Ray Serve."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return {"application": "NOT_DEPLOYED", "deployments": {}}
    return {"application": state_name(app.status), "deployments": {
        name: {"status": state_name(d.status), "replicas": {state_name(k): v for k, v in d.replica_states.items()}}
        for name, d in app.deployments.items()}}


def sample_sums(text: str) -> dict[str, float]:
    """Each sample name's values summed over its labels."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


def running_app(default: str = APP_NAME) -> str:
    """The lmfleet application deployed on the connected cluster (`default` when none is)."""
    running = serve.status().applications
    return next((name for name in LMFLEET_APPS if name in running), default)


def cluster_status(ray_address: str | None = "auto", app_name: str | None = None) -> dict[str, Any]:
    """Application and replica states from Ray Serve, and each replica's load from its last metrics
    (`app_name` None: the lmfleet application that runs there)."""
    connect(ray_address)
    app_name = app_name or running_app()
    recsys = app_name != APP_NAME
    result = {"name": app_name, "kind": "recsys" if recsys else "llm", **replica_status(app_name)}
    replicas = []
    store = store_handle()
    if store is not None:
        now = time.time()
        for replica, (stamp, text, where) in sorted(ray.get(store.raw.remote()).items()):
            sums = sample_sums(text)
            row = {"replica": replica, "pid": where["pid"], "node": where["node"], "age_s": now - stamp}
            if recsys:
                row.update(waiting=sums.get("lmfleet_recsys:num_requests_waiting", 0.0),
                           requests=sums.get("lmfleet_recsys:requests_total", 0.0),
                           events=sums.get("lmfleet_recsys:events_total", 0.0),
                           store_errors=sums.get("lmfleet_recsys:history_store_errors_total", 0.0))
            else:
                row.update(running=sums.get("lmfleet:num_requests_running", 0.0),
                           waiting=sums.get("lmfleet:num_requests_waiting", 0.0),
                           kv_cache_usage=sums.get("lmfleet:kv_cache_usage_perc", 0.0),
                           generation_tokens=sums.get("lmfleet:generation_tokens_total", 0.0))
            replicas.append(row)
    result["replicas"] = replicas
    return result
