"""GET /v1/stats: a small JSON view of the same metric families /metrics exposes, for the web
console and for scripts that do not speak Prometheus.

One function reads parsed families (a server's own registry, or the cluster endpoint's merged
replicas, whose samples carry a `replica` label): counters and histograms are summed over replicas,
gauges summed (requests) or averaged (KV-cache use), and each replica also gets its own line.
Percentiles are Prometheus's `histogram_quantile` over the cumulative buckets; the buckets are in
the answer too, so a client can take the difference of two answers for a recent window.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

HISTOGRAMS = {"time_to_first_token": "lmfleet:time_to_first_token_seconds",
              "inter_token": "lmfleet:inter_token_latency_seconds",
              "e2e_request": "lmfleet:e2e_request_latency_seconds",
              "queue": "lmfleet:request_queue_time_seconds"}
QUANTILES = (0.5, 0.9, 0.99)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus's estimate of the q-quantile from cumulative (upper bound, count) buckets, the
    last one +Inf: linear within the bucket that holds it; None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):  # in the +Inf bucket: the largest finite bound is all that is known
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _histogram(samples: list[Any]) -> dict[str, Any]:
    by_bound: dict[float, float] = defaultdict(float)
    total = count = 0.0
    for s in samples:
        if s.name.endswith("_bucket"):
            by_bound[float(s.labels["le"])] += s.value
        elif s.name.endswith("_sum"):
            total += s.value
        elif s.name.endswith("_count"):
            count += s.value
    buckets = sorted(by_bound.items())
    out: dict[str, Any] = {"count": count, "sum": total}
    out |= {f"p{round(q * 100)}": histogram_quantile(q, buckets) for q in QUANTILES}
    out["buckets"] = [["+Inf" if math.isinf(b) else b, c] for b, c in buckets]  # JSON has no infinity
    return out


def stats_from_families(families: Iterable[Metric], model_name: str,
                        replicas: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The /v1/stats answer from metric families. `replicas` maps a replica's id to what is known
    of it beyond its metrics (`healthy`, `age_s`); samples without a `replica` label belong to the
    replica "local" (the cluster endpoint's own families carry none and are not a replica's)."""
    samples: dict[str, list[Any]] = defaultdict(list)
    for family in families:
        for s in family.samples:
            samples[s.name].append(s)

    def total(name: str) -> float:
        return float(sum(s.value for s in samples.get(name, ())))

    # Each replica's own cumulative numbers, so that a client taking differences can treat a replica
    # that restarted (its counters went down) or appeared as Prometheus's rate() does.
    per_replica: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, name in (("running", "lmfleet:num_requests_running"), ("waiting", "lmfleet:num_requests_waiting"),
                      ("kv_cache_usage", "lmfleet:kv_cache_usage_perc"),
                      ("generation_tokens_total", "lmfleet:generation_tokens_total"),
                      ("prompt_tokens_total", "lmfleet:prompt_tokens_total"),
                      ("success_total", "lmfleet:request_success_total"),
                      ("errors_total", "lmfleet:http_errors_total"),
                      ("prefix_queries_total", "lmfleet:prefix_cache_queries_total"),
                      ("prefix_hits_total", "lmfleet:prefix_cache_hits_total")):
        for s in samples.get(name, ()):
            entry = per_replica[s.labels.get("replica", "local")]
            entry[key] = entry.get(key, 0.0) + s.value
    for key, name in (("ttft_buckets", HISTOGRAMS["time_to_first_token"]), ("itl_buckets", HISTOGRAMS["inter_token"])):
        for replica in per_replica:
            mine = [s for s in samples.get(name + "_bucket", ()) if s.labels.get("replica", "local") == replica]
            per_replica[replica][key] = _histogram(mine)["buckets"]
    known = replicas if replicas is not None else {"local": {"healthy": True}}
    lines = []
    for replica in sorted(set(per_replica) | set(known)):
        line = {"id": replica, "running": 0.0, "waiting": 0.0, "kv_cache_usage": None, "generation_tokens_total": 0.0}
        line |= per_replica.get(replica, {})
        line |= known.get(replica, {"healthy": False})
        lines.append(line)
    usages = [line["kv_cache_usage"] for line in lines if line["kv_cache_usage"] is not None]
    errors: dict[str, float] = defaultdict(float)
    for name in ("lmfleet:http_errors_total", "lmfleet:ingress_http_errors_total"):
        for s in samples.get(name, ()):
            errors[s.labels.get("status", "?")] += s.value
    finished: dict[str, float] = defaultdict(float)
    for s in samples.get("lmfleet:request_success_total", ()):
        finished[s.labels.get("finished_reason", "?")] += s.value
    return {
        "object": "stats", "model": model_name, "time": time.time(),
        "requests": {"running": total("lmfleet:num_requests_running"), "waiting": total("lmfleet:num_requests_waiting"),
                     "success_total": total("lmfleet:request_success_total"), "success_by_reason": dict(finished),
                     "errors_total": float(sum(errors.values())), "errors_by_status": dict(errors)},
        "tokens": {"prompt_total": total("lmfleet:prompt_tokens_total"),
                   "generation_total": total("lmfleet:generation_tokens_total")},
        "kv_cache_usage": sum(usages) / len(usages) if usages else None,
        "prefix_cache": {"queries_total": total("lmfleet:prefix_cache_queries_total"),
                         "hits_total": total("lmfleet:prefix_cache_hits_total")},
        "preemptions_total": total("lmfleet:num_preemptions_total"),
        "ingress_errors_total": total("lmfleet:ingress_http_errors_total"),
        "latency_seconds": {key: _histogram([s for suffix in ("_bucket", "_sum", "_count")
                                             for s in samples.get(name + suffix, ())])
                            for key, name in HISTOGRAMS.items()},
        "replicas": lines,
    }
