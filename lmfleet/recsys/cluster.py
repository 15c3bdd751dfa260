"""`lmfleet recsys serve --replicas N | --autoscale MIN:MAX`: recommender replicas on Ray Serve behind
the same ingress as the language models (keys, body limit, rate, retries on another replica,
cluster-wide /metrics and /health), all reading and writing one Redis history store.

    Ray Serve HTTP proxy ─► Ingress ─► RecsysReplica × N (each: the model, its batcher and the
                                        FastAPI app of `lmfleet recsys serve`)
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, replace
from typing import Any
from urllib.parse import urlparse

from ray import serve

from lmfleet.cluster import router as routing
from lmfleet.cluster.deploy import ClusterConfig, behind_ingress, replica_options, run_application, start_cluster
from lmfleet.cluster.replica import AppReplica
from lmfleet.errors import ConfigError
from lmfleet.recsys.serve import RecsysSettings
from lmfleet.serve.auth import KeyChecker
from lmfleet.serve.frontend import ServeSettings

APP_NAME = "lmfleet-recsys"
DEPLOYMENT = "RecsysReplica"
WEDGED_AFTER_S = 60.0


@serve.deployment(health_check_period_s=2, health_check_timeout_s=10)
class RecsysReplica(AppReplica):
    def __init__(self, model_dir: str, data_dir: str | None, settings: dict[str, Any], key_digests: list[str]):
        from lmfleet.recsys.serve import (
            MicroBatcher,
            Recommender,
            RecsysSettings,
            build_recsys_app,
            freeze_loaded_objects,
        )

        settings = RecsysSettings(**settings)
        recommender = Recommender(model_dir, data_dir)
        self.app = build_recsys_app(recommender, settings)
        self.server = self.app.state.server
        # Ray holds only the keys' digests (its state is visible to anyone on the cluster).
        self.server.checker = KeyChecker.from_digests(key_digests)
        self.server.batcher = MicroBatcher(recommender, self.server.settings, self.server.metrics)
        self.server.batcher.start(asyncio.get_event_loop())
        self.serve_app(self.app, self.server.metrics.render)
        freeze_loaded_objects()

    def check_health(self) -> None:
        """Ray Serve replaces a replica whose scoring loop stopped, or holds requests and has
        finished no batch for WEDGED_AFTER_S (an unreachable Redis is not the replica's fault: its
        requests get 503 and it stays)."""
        batcher = self.server.batcher
        if not batcher.alive:
            raise RuntimeError(f"the scoring loop is not running: {batcher.failed!r}")
        if batcher.stalled_for() > WEDGED_AFTER_S:
            raise RuntimeError(f"the scoring loop is wedged: no batch for {batcher.stalled_for():.0f} s")


def deploy_recsys(model_dir: str, data_dir: str | None, settings: RecsysSettings, config: ClusterConfig) -> list[str]:
    """Deploy the recommender's replicas behind the ingress; returns warnings."""
    if ((config.max_replicas > 1 or config.min_replicas == 0)
            and not (settings.history_store or "").startswith(("redis://", "rediss://"))):
        raise ConfigError("--replicas/--autoscale with more than one replica (or scaling to zero) need --history-store "
                          "redis://HOST:PORT/DB: every replica must see the events any of them took, and events "
                          "must outlive a replica")
    if urlparse(settings.history_store or "").password:
        raise ConfigError("--history-store: on Ray Serve, put the Redis password in LMFLEET_REDIS_PASSWORD on every "
                          "node, not in the URL (deployment arguments are readable by anyone on the cluster)")
    warnings = start_cluster(config)
    digests = KeyChecker(settings.api_keys).digests()
    # The ingress enforces the rate limit for the whole endpoint; replicas still check keys.
    replica_settings = asdict(replace(settings, api_keys=[], rate_limit=None, rate_burst=None,
                                      threads=settings.threads or max(1, int(config.cpus_per_replica))))
    per_replica = 2 * settings.max_batch  # a full batch scoring while the next one gathers
    options = replica_options(config, per_replica, settings.max_queued, routing.AvoidingPowerOfTwoRouter)
    replicas = RecsysReplica.options(**options).bind(str(model_dir), None if data_dir is None else str(data_dir),
                                                     replica_settings, digests)
    ingress_settings = ServeSettings(settings.model_name, settings.api_keys, settings.max_queued,
                                     settings.max_body_bytes, settings.rate_limit, settings.rate_burst,
                                     settings.protect_metrics)
    run_application(behind_ingress(replicas, config, ingress_settings, per_replica, DEPLOYMENT, console=False),
                    config.app_name)
    return warnings
