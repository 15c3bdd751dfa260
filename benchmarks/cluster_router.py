"""Time per routing decision at 1k and 100k known keys, one process, no cluster:

  * lmfleet's PrefixAffinityRouter (`lmfleet/cluster/router.py`): a new key, and a known key;
  * the same new-key rule computed by recounting every key's owner per decision (what the router
    did before it kept counts): the reference that grows with the number of keys;
  * Ray Serve's PrefixCacheAffinityRouter: the prefix-tree work of one decision (match, smallest
    tenants, insert) on the tree in process, plus the actor round trips its router makes per
    request (it keeps the tree in a separate actor and calls it with a blocking ray.get, 2-3 times);
    the round trip is measured on a local Ray unless --no-actor.

    python benchmarks/cluster_router.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
from collections import Counter
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from lmfleet.cluster.router import PrefixAffinityRouter

REPLICAS = 4
PROMPT_CHARS = 512


def replicas() -> list[SimpleNamespace]:
    deployment = DeploymentID(name="LLMReplica", app_name="lmfleet")
    return [SimpleNamespace(replica_id=ReplicaID(unique_id=f"r{i}", deployment_id=deployment)) for i in range(REPLICAS)]


def lmfleet_router(keys: int) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter(deployment_id=DeploymentID(name="LLMReplica", app_name="lmfleet"),
                                  handle_source=DeploymentHandleSource.UNKNOWN)
    router.initialize_state(imbalance_threshold=4, max_keys=2 * keys)
    for i, r in zip(range(keys), [r for _ in range(keys // REPLICAS + 1) for r in replicas()]):
        router.owners.assign(f"known {i}", r.replica_id)
    return router


def per_decision_us(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def time_lmfleet(keys: int, n: int) -> tuple[float, float]:
    """Decisions awaited back to back in one event loop, as the router makes them."""
    router, reps = lmfleet_router(keys), replicas()

    async def decide(make_key) -> float:
        pending = [SimpleNamespace(kwargs={"routing_key": make_key(i)}) for i in range(n)]
        start = time.perf_counter()
        for p in pending:
            await router.choose_replicas(reps, p)
        return (time.perf_counter() - start) / n * 1e6

    new = asyncio.run(decide(lambda i: f"new {keys} {i}"))
    known = asyncio.run(decide(lambda i: f"known {random.randrange(keys)}"))
    return new, known


def time_recount(keys: int, n: int) -> float:
    """The new-key rule by recounting: Counter over every key's owner, then the least-owning replica."""
    reps = replicas()
    owners = {f"known {i}": reps[i % REPLICAS].replica_id for i in range(keys)}
    by_id = {r.replica_id for r in reps}

    def decide(i: int) -> None:
        owned = Counter(owner for owner in owners.values() if owner in by_id)
        min(reps, key=lambda r: (owned[r.replica_id], random.random()))

    return per_decision_us(decide, max(1, n // 20))


def prompt(i: int) -> str:
    rng = random.Random(i)
    return f"{i:08d} " + "".join(rng.choice("abcdefghij klmnop") for _ in range(PROMPT_CHARS - 9))


def time_prefix_tree(keys: int, n: int) -> float:
    from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTree

    tree, tenants = PrefixTree(), [f"r{i}" for i in range(REPLICAS)]
    tree.add_tenants(tenants, time.time())
    for i in range(keys):
        tree.insert(prompt(i), tenants[i % REPLICAS], time.time())
    texts = [prompt(keys + i) for i in range(n)]

    def decide(i: int) -> None:
        tree.prefix_match(texts[i], tenants)
        tree.get_smallest_tenants()
        tree.insert(texts[i], tenants[i % REPLICAS], time.time())

    return per_decision_us(decide, n)


def time_actor_round_trip(n: int = 200) -> float:
    import ray

    @ray.remote(num_cpus=0)
    class Echo:
        def ping(self) -> None:
            return None

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        echo = Echo.remote()
        ray.get(echo.ping.remote())
        return per_decision_us(lambda _: ray.get(echo.ping.remote()), n)
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--no-actor", action="store_true", help="skip the actor round trip (no local Ray)")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {REPLICAS} replicas, "
          f"prompts of {PROMPT_CHARS} characters; microseconds per decision")
    print(f"{'keys':>8} {'lmfleet new key':>16} {'lmfleet known':>14} {'recount':>10} {'Ray prefix tree':>16}")
    for keys in (1_000, 100_000):
        new, known = time_lmfleet(keys, args.decisions)
        recount = time_recount(keys, args.decisions)
        tree = time_prefix_tree(keys, max(50, args.decisions // 10))
        print(f"{keys:>8} {new:>16.1f} {known:>14.1f} {recount:>10.1f} {tree:>16.1f}")
    if not args.no_actor:
        trip = time_actor_round_trip()
        print(f"one ray.get round trip to an actor: {trip:.0f} us (Ray's router makes 2-3 per request, "
              "blocking its event loop)")


if __name__ == "__main__":
    main()
