"""`lmfleet bench serve`: load an OpenAI-compatible server over HTTP and measure it, like
`vllm bench serve`: TTFT, TPOT, inter-token latency and end-to-end latency (mean, median, p90,
p99), request and token throughput, failures.

It speaks only HTTP (token-id prompts to /v1/completions, `ignore_eos` so outputs have the asked
length), so it measures any server that accepts those, not only lmfleet's.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from lmfleet.engine.bench import synthetic_requests
from lmfleet.errors import ConfigError


@dataclass
class BenchConfig:
    url: str
    num_prompts: int = 100
    concurrency: int | None = None  # closed loop: at most this many requests in flight
    request_rate: float | None = None  # open loop: Poisson arrivals at this rate (requests/s)
    dataset: str = "random"  # random | prefix
    input_len: tuple[int, int] = (32, 256)
    output_len: tuple[int, int] = (32, 128)
    prefix_len: int = 256
    num_prefixes: int = 4
    token_range: tuple[int, int] = (100, 1000)
    stream: bool = True
    model: str | None = None
    api_key: str | None = None
    seed: int = 0
    timeout: float = 600.0


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pct(q: float) -> float:
        k = (len(ordered) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"mean": statistics.fmean(ordered), "median": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)}


async def _one(client: httpx.AsyncClient, cfg: BenchConfig, model: str, prompt: list[int], max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": cfg.stream}
    if cfg.stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    result = RequestResult(ok=False, prompt_tokens=len(prompt))
    try:
        if not cfg.stream:
            response = await client.post("/v1/completions", json=body)
            if response.status_code != 200:
                result.error = f"{response.status_code}: {response.text[:200]}"
                return result
            data = response.json()
            result.latency = result.ttft = time.perf_counter() - start
            result.output_tokens = data["usage"]["completion_tokens"]
            result.ok = True
            return result
        last, done = None, False
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                data = json.loads(payload)
                if "error" in data:
                    result.error = str(data["error"])[:200]
                    return result
                if data.get("usage"):
                    result.output_tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = last is not None and done
        if last is None:
            result.error = "the stream carried no text"
        elif not done:
            result.error = "the stream ended without [DONE]"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    return result


async def _resolve_model(client: httpx.AsyncClient) -> str:
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach the server: {exc}") from None
    if response.status_code != 200:
        raise ConfigError(f"GET /v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"][0]["id"]


async def run_benchmark(cfg: BenchConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    if cfg.num_prompts < 1:
        raise ConfigError(f"--num-prompts {cfg.num_prompts} must be >= 1")
    if (cfg.concurrency is None) == (cfg.request_rate is None):
        raise ConfigError("give exactly one of --concurrency or --request-rate")
    if cfg.concurrency is not None and cfg.concurrency < 1:
        raise ConfigError(f"--concurrency {cfg.concurrency} must be >= 1")
    if cfg.request_rate is not None and cfg.request_rate <= 0:
        raise ConfigError(f"--request-rate {cfg.request_rate} must be > 0")
    if cfg.dataset not in ("random", "prefix"):
        raise ConfigError(f"--dataset {cfg.dataset!r}: choose random or prefix")
    prefix_len = cfg.prefix_len if cfg.dataset == "prefix" else 0
    requests = synthetic_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.token_range, prefix_len,
                                  cfg.num_prefixes, cfg.seed)
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    in_flight = cfg.concurrency or cfg.num_prompts
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers, timeout=cfg.timeout,
                                 limits=limits) as client:
        model = cfg.model or await _resolve_model(client)
        results: list[RequestResult] = []
        gate = asyncio.Semaphore(in_flight)

        async def run(prompt: list[int], n: int) -> None:
            async with gate:
                results.append(await _one(client, cfg, model, prompt, n))
            if progress:
                progress(len(results), len(requests))

        rng = random.Random(cfg.seed + 1)
        start = time.perf_counter()
        tasks = []
        for prompt, n in requests:
            tasks.append(asyncio.create_task(run(prompt, n)))
            if cfg.request_rate is not None:
                await asyncio.sleep(rng.expovariate(cfg.request_rate))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(cfg, model, results, duration)


def summarize(cfg: BenchConfig, model: str, results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    summary: dict[str, Any] = {
        "model": model, "url": cfg.url, "dataset": cfg.dataset, "stream": cfg.stream,
        "concurrency": cfg.concurrency, "request_rate": cfg.request_rate, "num_prompts": len(results),
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": output / duration,
        "total_token_throughput": (prompt + output) / duration, "prompt_tokens": prompt, "output_tokens": output,
    }
    latencies = [("e2e_latency_s", [r.latency for r in ok])]
    if cfg.stream:  # token timings need a stream
        latencies = [("ttft_s", [r.ttft for r in ok]), ("tpot_s", tpot), ("itl_s", [x for r in ok for x in r.itl]),
                     *latencies]
    for name, values in latencies:
        summary[name] = _percentiles(values)
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_errors"] = errors[:3]
    return summary
