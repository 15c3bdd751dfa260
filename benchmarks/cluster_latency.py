"""Where the cluster endpoint's added latency comes from, one run, one machine, requests one at a
time (p50 of --requests each):

  * one `lmfleet serve` process: GET /v1/models and a 1-token completion;
  * the same model on Ray Serve (1 replica): the same two requests, through the HTTP proxy, the
    ingress and the replica;
  * Ray Serve alone, no model: a deployment answering a constant straight from the proxy, and an
    ingress that asks a second deployment for it (the floor of one and of two hops).

    python benchmarks/cluster_latency.py --model runs/quickstart/tiny/final
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx
from common import free_port, wait_healthy


def p50_ms(client: httpx.Client, method: str, url: str, n: int, **kwargs) -> float:
    for _ in range(5):  # warm-up
        client.request(method, url, **kwargs)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        response = client.request(method, url, **kwargs)
        times.append(time.perf_counter() - start)
        if response.status_code != 200:
            raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")
    return statistics.median(times) * 1e3


def lmfleet_pair(client: httpx.Client, url: str, n: int) -> tuple[float, float]:
    body = {"model": "m", "prompt": "def add(a, b):", "max_tokens": 1, "temperature": 0}
    return (p50_ms(client, "GET", f"{url}/v1/models", n),
            p50_ms(client, "POST", f"{url}/v1/completions", n, json=body))


def bare_ray_serve(client: httpx.Client, port: int, n: int) -> tuple[float, float]:
    """Through the proxy lmfleet's deployment started (Serve keeps one HTTP proxy per node)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    @serve.deployment
    class Constant:
        async def get(self) -> bytes:
            return b"ok"

    @serve.deployment
    class Front:
        def __init__(self, constant=None):
            self.constant = constant

        async def __call__(self, request: Request) -> Response:
            if request.url.path == "/two":
                return Response(await self.constant.get.remote())
            return Response(b"ok")

    serve.run(Front.bind(Constant.bind()), name="floor", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        return p50_ms(client, "GET", f"{url}/one", n), p50_ms(client, "GET", f"{url}/two", n)
    finally:
        serve.delete("floor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    client = httpx.Client(timeout=60)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from lmfleet.cli import main; main()", "serve", args.model,
                             "--port", str(port), "--served-model-name", "m", "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        single = lmfleet_pair(client, f"http://127.0.0.1:{port}", args.requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    from lmfleet.cluster import deploy as cluster
    from lmfleet.serve import ServeSettings

    port = free_port()
    try:
        cluster.deploy(args.model, ServeSettings("m"), {}, cluster.ClusterConfig(replicas=1, cpus_per_replica=1, port=port))
        wait_healthy(f"http://127.0.0.1:{port}")
        cluster = lmfleet_pair(client, f"http://127.0.0.1:{port}", args.requests)
        from ray import serve

        serve.delete(cluster.APP_NAME)
        one_hop, two_hops = bare_ray_serve(client, port, args.requests)
    finally:
        cluster.shutdown()

    print(f"p50 latency, {args.requests} requests one at a time, {os.cpu_count()} cores")
    print(f"  GET /v1/models:          one process {single[0]:6.1f} ms   Ray Serve {cluster[0]:6.1f} ms   "
          f"added {cluster[0] - single[0]:+.1f} ms")
    print(f"  1-token completion:      one process {single[1]:6.1f} ms   Ray Serve {cluster[1]:6.1f} ms   "
          f"added {cluster[1] - single[1]:+.1f} ms")
    print(f"  Ray Serve alone:         proxy -> deployment {one_hop:.1f} ms, proxy -> deployment -> deployment "
          f"{two_hops:.1f} ms (lmfleet's path has the second shape)")


if __name__ == "__main__":
    main()
