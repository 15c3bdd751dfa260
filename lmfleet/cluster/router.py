"""LLM-aware request routing for Ray Serve: prefix affinity with a load guard, else power of two
choices.

The ingress computes a routing key per request (a digest of the prompt's first characters, or of
an `X-Session-ID` header) and passes it as the `routing_key` keyword. A key seen before goes to
the replica that served it — whose KV cache holds that prefix — unless that replica's queue is
longer than the shortest one by more than `imbalance_threshold`; then the less loaded of two
random replicas takes it. A new key goes to the replica that owns the fewest keys (then the
shortest queue). Whichever replica serves a key becomes its owner.

A retried request carries `avoid`, the replica that refused it: both routers leave that replica
out while another one is there. Every decision costs O(replicas), whatever the number of keys.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from lmfleet.cluster import stats  # by reference: this module itself is shipped by value


def routing_key_of(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get("routing_key")
    return key if isinstance(key, str) and key else None


def without_avoided(candidates: list[RunningReplica], pending_request: PendingRequest | None) -> list[RunningReplica]:
    """The candidates less the replica a retried request must avoid (all of them if it is the only one)."""
    avoid = pending_request.kwargs.get("avoid") if pending_request is not None else None
    if not avoid:
        return candidates
    others = [r for r in candidates if r.replica_id.unique_id != avoid]
    return others or candidates


class KeyOwners:
    """Which replica owns each routing key, least recently used first, at most `max_keys`; every
    operation O(1) (the count of keys per replica is kept, not recounted)."""

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self.owner: OrderedDict[str, ReplicaID] = OrderedDict()
        self.count: dict[ReplicaID, int] = {}

    def __len__(self) -> int:
        return len(self.owner)

    def get(self, key: str) -> ReplicaID | None:
        return self.owner.get(key)

    def owned(self, replica: ReplicaID) -> int:
        return self.count.get(replica, 0)

    def assign(self, key: str, replica: ReplicaID) -> None:
        """`replica` owns `key` now (and it is the most recently used)."""
        previous = self.owner.get(key)
        if previous != replica:
            if previous is not None:
                self._uncount(previous)
            self.owner[key] = replica
            self.count[replica] = self.count.get(replica, 0) + 1
        self.owner.move_to_end(key)
        while len(self.owner) > self.max_keys:
            _, evicted = self.owner.popitem(last=False)
            self._uncount(evicted)

    def drop_replica(self, replica: ReplicaID) -> None:
        """Forget the replica's count; its keys fall to whoever serves them next (O(1): a key
        whose owner is gone is simply not a hit)."""
        self.count.pop(replica, None)

    def _uncount(self, replica: ReplicaID) -> None:
        left = self.count.get(replica, 0) - 1
        if left > 0:
            self.count[replica] = left
        else:
            self.count.pop(replica, None)


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, imbalance_threshold: int = 4, max_keys: int = 100_000, **kwargs: Any) -> None:
        self.imbalance_threshold = imbalance_threshold
        self.owners = KeyOwners(max_keys)

    def _two_choices(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        return random.sample(candidates, min(2, len(candidates)))

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidates = without_avoided(candidate_replicas, pending_request)
        if not candidates:
            return []
        key = routing_key_of(pending_request)
        if key is None:
            stats.DECISIONS["no_key"] += 1
            return [self._two_choices(candidates)]
        owner_id = self.owners.get(key)
        owner = next((r for r in candidates if r.replica_id == owner_id), None) if owner_id is not None else None
        if owner is not None:
            if self._queue_len(owner) <= min(map(self._queue_len, candidates)) + self.imbalance_threshold:
                stats.DECISIONS["prefix_hit"] += 1
                others = [r for r in candidates if r is not owner]
                return [[owner], self._two_choices(others)] if others else [[owner]]
            stats.DECISIONS["prefix_overloaded"] += 1
            return [self._two_choices(candidates)]
        # A new key: the replica owning the fewest keys (then the shortest queue) takes it, so
        # prefixes spread evenly and each replica's cache holds its share.
        stats.DECISIONS["new_key"] += 1
        ranked = sorted(candidates, key=lambda r: (self.owners.owned(r.replica_id), self._queue_len(r),
                                                   random.random()))
        # Claim the key now: requests for other new keys routed before this one lands must see it.
        self.owners.assign(key, ranked[0].replica_id)
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = routing_key_of(pending_request)
        if key is not None:
            self.owners.assign(key, replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.owners.drop_replica(replica_id)


class AvoidingPowerOfTwoRouter(PowerOfTwoChoicesRequestRouter):
    """Ray Serve's default router, except that a retried request avoids the replica that refused it."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidates = without_avoided(candidate_replicas, pending_request)
        if len(candidates) < len(candidate_replicas):
            return [random.sample(candidates, min(2, len(candidates)))]
        return await super().choose_replicas(candidate_replicas, pending_request)
