"""LLM-aware request routing for Ray Serve: prefix affinity with a load guard, else power of two
choices.

The ingress computes a routing key per request (a digest of the prompt's first characters, or of
an `X-Session-ID` header) and passes it as the `routing_key` keyword. A key seen before goes to
the replica that served it — whose KV cache holds that prefix — unless that replica's queue is
longer than the shortest one by more than `imbalance_threshold`; then the less loaded of two
random replicas takes it. A new key goes to the replica that owns the fewest keys (then the
shortest queue). Whichever replica serves a key becomes its owner.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from lmfleet.cluster import stats  # by reference: this module itself is shipped by value


def routing_key_of(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get("routing_key")
    return key if isinstance(key, str) and key else None


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 4, max_keys: int = 100_000, **kwargs: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.max_keys = max_keys
        self.owners: OrderedDict[str, ReplicaID] = OrderedDict()

    def _two_choices(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        return random.sample(candidates, min(2, len(candidates)))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = routing_key_of(pending_request)
        if key is None:
            stats.DECISIONS["no_key"] += 1
            return [self._two_choices(candidate_replicas)]
        by_id = {r.replica_id: r for r in candidate_replicas}
        owner = self.owners.get(key)
        if owner in by_id:
            lengths = {rid: self.replica_queue_len_cache.get(rid) or 0 for rid in by_id}
            if lengths[owner] <= min(lengths.values()) + self.imbalance_threshold:
                self.owners.move_to_end(key)
                stats.DECISIONS["prefix_hit"] += 1
                others = [r for r in candidate_replicas if r.replica_id != owner]
                return [[by_id[owner]], self._two_choices(others)] if others else [[by_id[owner]]]
            stats.DECISIONS["prefix_overloaded"] += 1
            return [self._two_choices(candidate_replicas)]
        # A new key: the replica owning the fewest keys (then the shortest queue) takes it, so
        # prefixes spread evenly and each replica's cache holds its share.
        stats.DECISIONS["new_key"] += 1
        owned = Counter(owner for owner in self.owners.values() if owner in by_id)
        ranked = sorted(candidate_replicas, key=lambda r: (owned[r.replica_id],
                                                           self.replica_queue_len_cache.get(r.replica_id) or 0,
                                                           random.random()))
        # Claim the key now: requests for other new keys routed before this one lands must see it.
        self.owners[key] = ranked[0].replica_id
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = routing_key_of(pending_request)
        if key is None:
            return
        self.owners[key] = replica_id
        self.owners.move_to_end(key)
        while len(self.owners) > self.max_keys:
            self.owners.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, owner in self.owners.items() if owner == replica_id]:
            del self.owners[key]
