"""Prometheus metrics of one server, named as vLLM's with the `lmfleet:` prefix.

Engine counters and gauges (running/waiting requests, KV-cache usage, prefix-cache queries and
hits, preemptions, prompt and generation tokens) are read from the engine at scrape time; latency
histograms are observed by the server as requests stream. Each app has its own registry, so
several servers can live in one process (tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, status: Any, model_name: str):
        self.status, self.model_name = status, model_name

    def collect(self) -> Iterator[Any]:
        s = self.status()
        labels = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self.model_name], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self.model_name], value)
            return c

        yield gauge("lmfleet:num_requests_running", "Sequences in the running batch.", s["running"])
        yield gauge("lmfleet:num_requests_waiting", "Sequences waiting to be scheduled.", s["waiting"])
        yield gauge("lmfleet:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", s["kv_cache_usage"])
        yield counter("lmfleet:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (once per admitted sequence).",
                      s["prefix_queries"])
        yield counter("lmfleet:prefix_cache_hits", "Prompt tokens found in the prefix cache.", s["prefix_hits"])
        yield counter("lmfleet:num_preemptions", "Sequences preempted (blocks freed, recomputed later).",
                      s["preemptions"])
        yield counter("lmfleet:prompt_tokens", "Prompt tokens accepted.", s["prompt_tokens"])
        yield counter("lmfleet:generation_tokens", "Tokens generated.", s["generation_tokens"])


class ServerMetrics:
    def __init__(self, status: Any, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(status, model_name))
        self.model_name = model_name
        kw = dict(labelnames=["model_name"], registry=self.registry)
        self.ttft = Histogram("lmfleet:time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram("lmfleet:inter_token_latency_seconds", "Time between output tokens.",
                             buckets=TOKEN_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram("lmfleet:e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, **kw).labels(model_name)
        self.queue = Histogram("lmfleet:request_queue_time_seconds", "Arrival to first scheduled.",
                               buckets=LATENCY_BUCKETS, **kw).labels(model_name)
        self.success = Counter("lmfleet:request_success", "Finished requests by finish reason.",
                               labelnames=["model_name", "finished_reason"], registry=self.registry)
        self.http_errors = Counter("lmfleet:http_errors", "Requests answered with an error, by status.",
                                   labelnames=["model_name", "status"], registry=self.registry)

    def finished(self, metrics: dict[str, float | None], reason: str | None) -> None:
        """Observe a finished request's timings (monotonic seconds from the engine)."""
        arrival, first = metrics.get("arrival_time"), metrics.get("first_token_time")
        scheduled, done = metrics.get("scheduled_time"), metrics.get("finished_time")
        if arrival is not None and first is not None:
            self.ttft.observe(max(0.0, first - arrival))
        if arrival is not None and scheduled is not None:
            self.queue.observe(max(0.0, scheduled - arrival))
        if arrival is not None and done is not None:
            self.e2e.observe(max(0.0, done - arrival))
        self.success.labels(self.model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
