"""Rank 0's Prometheus endpoint during training (`--metrics-port`): the latest step's loss,
throughput and MFU, validation loss, progress, restarts and checkpoint age, as `lmfleet_train:*`
gauges labelled with the run's name. It is fed the records the trainer writes to metrics.jsonl,
so both say the same; it runs on its own thread and never stops a training run (a port it cannot
bind is a warning)."""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

BIND_TRIES = 10  # a restarted rank 0 may find its predecessor's socket not yet released
BIND_PAUSE_S = 0.5
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics in Prometheus's text format, whatever the scraper's Accept header: prometheus_client's
    OpenMetrics output, which Prometheus asks for first, escapes the ':' of lmfleet_train:* to '_'."""

    registry: CollectorRegistry
    timeout = 5  # seconds a connection may stay silent: an idle client does not hold a thread for ever

    def do_GET(self) -> None:  # noqa: N802 - the http.server method name
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404)
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", TEXT_FORMAT)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:  # scrapes are not worth a line in the training log
        pass


class TrainingExporter(Collector):
    def __init__(self, run: str, total_steps: int, world_size: int, attempt: int):
        self.run, self.total_steps, self.world_size, self.attempt = run, total_steps, world_size, attempt
        self.values: dict[str, float] = {}
        self.last_step_time: float | None = None
        self.last_checkpoint_time: float | None = None
        self.registry = CollectorRegistry()
        self.registry.register(self)
        self.server: Any = None

    def observe(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (train, eval, checkpoint, start or stop)."""
        kind, values = record.get("kind"), dict(self.values)
        if kind == "train":
            for key, name in (("step", "step"), ("loss", "loss"), ("tokens_per_s", "tokens_per_second"),
                              ("mfu", "mfu"), ("tokens", "tokens_seen"), ("grad_norm", "grad_norm"),
                              ("step_time_s", "step_time_seconds"), ("lr", "learning_rate")):
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values[name] = float(value)
            self.last_step_time = time.time()
        elif kind == "eval" and isinstance(record.get("val_loss"), (int, float)):
            values["val_loss"] = float(record["val_loss"])
        elif kind == "checkpoint":
            self.last_checkpoint_time = time.time()
        elif kind == "start" and isinstance(record.get("step"), int):
            values["step"] = float(record["step"])
        self.values = values  # one assignment: a scrape sees one step's values together

    def collect(self) -> Any:
        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"lmfleet_train:{name}", doc, labels=["run"])
            family.add_metric([self.run], value)
            return family

        docs = {"step": "Optimizer steps done.", "loss": "Training loss of the latest step.",
                "tokens_per_second": "Training tokens per second of the latest step (all ranks).",
                "mfu": "Model FLOPs utilization of the latest step (0-1).",
                "tokens_seen": "Training tokens consumed so far.", "grad_norm": "Gradient norm of the latest step.",
                "step_time_seconds": "Wall time of the latest step.", "learning_rate": "Learning rate of the latest step.",
                "val_loss": "Validation loss of the latest evaluation."}
        values = self.values
        for name, doc in docs.items():
            if name in values:
                yield gauge(name, doc, values[name])
        yield gauge("total_steps", "Steps the run is configured for.", self.total_steps)
        yield gauge("world_size", "Processes training.", self.world_size)
        if self.last_step_time is not None:
            yield gauge("last_step_timestamp_seconds", "Unix time the latest step finished.", self.last_step_time)
        if self.last_checkpoint_time is not None:
            yield gauge("checkpoint_age_seconds", "Seconds since the run's newest checkpoint (since this "
                        "attempt's start while it has none).",
                        time.time() - self.last_checkpoint_time)
        restarts = CounterMetricFamily("lmfleet_train:restarts", "Restarts of the worker group so far "
                                       "(torchrun's restart count).", labels=["run"])
        restarts.add_metric([self.run], self.attempt)
        yield restarts

    def start(self, port: int, host: str) -> bool:
        """Serve /metrics on host:port; False (and a warning) when the port cannot be bound."""
        try:  # IPv4 or IPv6, as the host names it
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except OSError as exc:
            print(f"warning: training metrics not served: cannot resolve {host!r} ({exc}); training goes on",
                  file=sys.stderr, flush=True)
            return False
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        handler = type("Handler", (_MetricsHandler,), {"registry": self.registry})
        for attempt in range(BIND_TRIES):
            try:
                self.server = server_class((host, port), handler)
                threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True).start()
                return True
            except OSError as exc:
                if attempt + 1 == BIND_TRIES:
                    print(f"warning: training metrics not served: cannot listen on {host}:{port} ({exc.strerror}); "
                          "training goes on", file=sys.stderr, flush=True)
                    return False
                time.sleep(BIND_PAUSE_S)
        return False

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
