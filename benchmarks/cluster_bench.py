"""Ray Serve cluster against one `lmfleet serve` process, same run, same model:

  * throughput scaling: N replicas x 1 thread vs 1 replica x 1 thread at saturation;
  * router overhead: TTFT at concurrency 1 through Ray Serve (1 replica, 1 thread) vs one
    single-process server with 1 thread;
  * shared-prefix workload (4 long shared prefixes): TTFT and throughput with prefix-affinity
    routing vs Ray Serve's default, 2 replicas, a KV cache that holds about two prefixes each.

    python benchmarks/cluster_bench.py --model runs/quickstart/tiny/final
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx
from common import free_port, wait_healthy

from lmfleet.serve import ServeSettings
from lmfleet.serve.bench import BenchConfig, run_benchmark


def bench(url: str, **kwargs) -> dict:
    asyncio.run(run_benchmark(BenchConfig(url, 4, 4, None, "random", (16, 32), (8, 8), token_range=(100, 8000))))
    return asyncio.run(run_benchmark(BenchConfig(url, token_range=(100, 8000), **kwargs)))


def line(name: str, r: dict) -> str:
    return (f"{name:<42} {r['output_token_throughput']:8.1f} out tok/s  TTFT p50 {r['ttft_s']['median'] * 1e3:7.1f} ms"
            f"  p99 {r['ttft_s']['p99'] * 1e3:7.1f} ms  failed {r['failed']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    results: dict = {}
    saturate = dict(num_prompts=args.num_prompts, concurrency=args.concurrency, input_len=(32, 128),
                    output_len=(32, 64))
    single = dict(num_prompts=24, concurrency=1, input_len=(32, 128), output_len=(16, 16))

    # One process, one thread.
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", "from lmfleet.cli import main; main()", "serve", args.model,
                             "--port", str(port), "--kv-cache-memory", "256MiB", "--log-level", "warning"], env=env)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        results["single_c1"] = bench(f"http://127.0.0.1:{port}", **single)
        results["single_saturated"] = bench(f"http://127.0.0.1:{port}", **saturate)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    from ray import serve

    from lmfleet.cluster.deploy import APP_NAME, ClusterConfig, deploy, shutdown

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    engine = {"kv_cache_memory": 256 * 2**20}
    try:
        deploy(args.model, ServeSettings("tiny"), engine, ClusterConfig(replicas=1, cpus_per_replica=1, port=port))
        wait_healthy(url)
        results["ray1_c1"] = bench(url, **single)
        results["ray1_saturated"] = bench(url, **saturate)
        serve.delete(APP_NAME)
        deploy(args.model, ServeSettings("tiny"), engine, ClusterConfig(replicas=args.replicas, cpus_per_replica=1,
                                                                       port=port))
        wait_healthy(url)
        results[f"ray{args.replicas}_saturated"] = bench(url, **saturate)
        prefix = dict(num_prompts=args.num_prompts, concurrency=8, dataset="prefix", prefix_len=384, num_prefixes=4,
                      input_len=(8, 32), output_len=(8, 16))
        for router in ("prefix", "pow2"):
            serve.delete(APP_NAME)
            # About two prefixes (384 tokens = 24 blocks each) per replica, plus room for the running requests.
            deploy(args.model, ServeSettings("tiny"), {"num_blocks": 2 * 24 + 24},
                   ClusterConfig(replicas=2, cpus_per_replica=1, port=port, router=router))
            wait_healthy(url)
            results[f"shared_prefix_{router}"] = bench(url, **prefix)
            metrics = httpx.get(f"{url}/metrics").text
            hits = sum(float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines()
                       if x.startswith("lmfleet:prefix_cache_hits_total{"))
            queries = sum(float(x.rsplit(" ", 1)[1]) for x in metrics.splitlines()
                          if x.startswith("lmfleet:prefix_cache_queries_total{"))
            results[f"shared_prefix_{router}"]["prefix_cache_hit_rate"] = hits / queries if queries else 0.0
    finally:
        shutdown()

    n = args.replicas
    ray_n, ray_1 = results[f"ray{n}_saturated"], results["ray1_saturated"]
    scaling = ray_n["output_token_throughput"] / ray_1["output_token_throughput"]
    overhead_ms = (results["ray1_c1"]["ttft_s"]["median"] - results["single_c1"]["ttft_s"]["median"]) * 1e3
    print(f"model {args.model}; {os.cpu_count()} cores; load generator on the same machine")
    for key, r in results.items():
        extra = f"  prefix-cache hit rate {r['prefix_cache_hit_rate']:.3f}" if "prefix_cache_hit_rate" in r else ""
        print(line(key, r) + extra)
    print(f"throughput scaling {n} replicas x 1 thread / 1 x 1 thread: {scaling:.2f}x (goal >= 1.8)")
    print(f"router overhead (TTFT p50, concurrency 1, Ray Serve 1 replica vs one process): {overhead_ms:+.1f} ms "
          "(goal <= 5 ms)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"results": results, "scaling": scaling, "router_overhead_ms": overhead_ms}, f, indent=2)


if __name__ == "__main__":
    main()
