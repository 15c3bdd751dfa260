"""Overload: open-loop Poisson arrivals at multiples of the measured capacity against a bounded
queue (`--max-num-seqs` running, `--max-queued-requests` waiting), on Ray Serve replicas or, with
`--single`, one `lmfleet serve` process. Per offered rate: requests/s offered and served, the
share answered 429, latency of the admitted requests (p50/p99) and of the refusals (p99).

    python benchmarks/overload.py --model runs/quickstart/tiny/final            # the cluster
    python benchmarks/overload.py --model runs/quickstart/tiny/final --single   # one process
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from common import free_port, stop, wait_healthy

from lmfleet.serve import ServeSettings


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float]:
    start = time.monotonic()
    try:
        status = (await client.post(f"{url}/v1/completions", json=body)).status_code
    except httpx.HTTPError:
        status = -1
    return status, time.monotonic() - start


async def closed_loop(url: str, body: dict, concurrency: int, seconds: float) -> float:
    """Requests/s served with `concurrency` clients back to back: the capacity."""
    done, stop = 0, time.monotonic() + seconds

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop:
            status, _ = await one(client, url, body)
            done += status == 200

    async with httpx.AsyncClient(timeout=300) as client:
        start = time.monotonic()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return done / (time.monotonic() - start)


async def open_loop(url: str, body: dict, rate: float, seconds: float, seed: int) -> dict:
    rng = random.Random(seed)
    tasks = []
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.monotonic()
        at = start
        while at < start + seconds:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            tasks.append(asyncio.create_task(one(client, url, body)))
            at += rng.expovariate(rate)
        offered_s = time.monotonic() - start
        results = await asyncio.gather(*tasks)
        wall = time.monotonic() - start
    ok = [t for s, t in results if s == 200]
    refused = [t for s, t in results if s == 429]
    return {"offered": len(results) / offered_s, "served": len(ok) / wall, "share_429": len(refused) / len(results),
            "other": len(results) - len(ok) - len(refused), "p50": quantile(ok, 0.5), "p99": quantile(ok, 0.99),
            "p99_429": quantile(refused, 0.99), "n": len(results), "wall": wall}


@contextmanager
def single_server(model: str, port: int, max_num_seqs: int, max_queued: int):
    """One `lmfleet serve` process with one torch thread (a replica's share: `--cpus-per-replica 1`)."""
    lmfleet = Path(sys.executable).with_name("lmfleet")
    proc = subprocess.Popen([str(lmfleet), "serve", model, "--port", str(port), "--served-model-name", "m",
                             "--max-num-seqs", str(max_num_seqs), "--max-queued-requests", str(max_queued),
                             "--kv-cache-memory", "64MiB", "--log-level", "warning"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield
    finally:
        stop(proc)


@contextmanager
def cluster(model: str, port: int, replicas: int, max_num_seqs: int, max_queued: int):
    from lmfleet.cluster.deploy import ClusterConfig, deploy, shutdown

    settings = ServeSettings("m", max_queued_requests=max_queued)
    engine = {"kv_cache_memory": 64 * 2**20, "max_num_seqs": max_num_seqs}
    try:
        deploy(model, settings, engine, ClusterConfig(replicas=replicas, cpus_per_replica=1, port=port))
        yield
    finally:
        shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--single", action="store_true", help="one lmfleet serve process instead of Ray Serve")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--max-queued-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0, help="per offered rate")
    parser.add_argument("--loads", default="0.5,1,2,4", help="offered rates as multiples of the capacity")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": args.max_tokens, "ignore_eos": True,
            "temperature": 0}
    replicas = 1 if args.single else args.replicas
    target = single_server(args.model, port, args.max_num_seqs, args.max_queued_requests) if args.single else \
        cluster(args.model, port, replicas, args.max_num_seqs, args.max_queued_requests)
    with target:
        wait_healthy(url)
        capacity = asyncio.run(closed_loop(url, body, replicas * args.max_num_seqs, 10.0))
        rows = [(load, asyncio.run(open_loop(url, body, load * capacity, args.seconds, seed=i)))
                for i, load in enumerate(float(x) for x in args.loads.split(","))]
    where = "one lmfleet serve process (1 thread)" if args.single else f"{replicas} Ray Serve replica(s)"
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {args.model}; "
          f"{where} x --max-num-seqs {args.max_num_seqs}, --max-queued-requests "
          f"{args.max_queued_requests}; {args.max_tokens} output tokens per request; {args.seconds:g} s per rate; "
          "load generator on the same machine")
    print(f"capacity (closed loop, {replicas * args.max_num_seqs} clients): {capacity:.1f} requests/s")
    print("served/s: admitted requests over the whole run (arrivals, then until the last admitted one ended: wall)")
    print(f"{'load':>5} {'offered/s':>10} {'served/s':>9} {'wall':>6} {'429 share':>10} {'other':>6} {'p50 ok':>8} "
          f"{'p99 ok':>8} {'p99 429':>8}")
    for load, r in rows:
        print(f"{load:>5g} {r['offered']:>10.1f} {r['served']:>9.1f} {r['wall']:>5.1f}s {r['share_429']:>10.1%} "
              f"{r['other']:>6d} "
              f"{r['p50']:>7.2f}s {r['p99']:>7.2f}s {r['p99_429'] * 1e3:>6.0f}ms")


if __name__ == "__main__":
    main()
