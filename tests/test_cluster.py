"""Cluster serving on a real local Ray: replicas behind one endpoint, prefix-affinity routing
against Ray Serve's default, a replica killed under load, autoscaling, and a clean shutdown.
One Ray cluster for the whole module (each deployment replaces the previous one)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import psutil
import pytest

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.serve import ServeSettings

from .helpers import chat_model_dir, free_port, run_cli

ray = pytest.importorskip("ray")  # a dev dependency: installed by `make install`; never skipped in CI

pytestmark = pytest.mark.integration
NAME = "tiny-cluster"
SYSTEMS = [f"System prompt number {i}. " + "You answer questions about foxes and dogs and lazy days. " * 6
           for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return chat_model_dir(tmp_path_factory.mktemp("cluster"), tokenizer, 512, 31)


@pytest.fixture(scope="module")
def cluster():
    """The module's Ray: started by the first deploy, shut down at the end; afterwards no process
    it started may be left."""
    from lmfleet.cluster import ray_serve

    port = free_port()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield port
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    ray_serve.shutdown()
    gone, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


def deploy(model_dir, port, **kwargs):
    from ray import serve

    from lmfleet.cluster.ray_serve import APP_NAME
    from lmfleet.cluster.ray_serve import deploy as ray_deploy

    if ray.is_initialized():  # a fresh application each time, not a rolling update of the last one
        serve.delete(APP_NAME)
    engine_kwargs = kwargs.pop("engine_kwargs", {"kv_cache_memory": 4 * 2**20})
    settings = kwargs.pop("settings", ServeSettings(NAME))
    ray_deploy(str(model_dir), settings, engine_kwargs, port=port, **kwargs)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "cluster endpoint never became healthy"
        time.sleep(0.25)
    return url


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


def total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def per_replica(text: str, name: str) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            replica = line.split('replica="', 1)[1].split('"', 1)[0]
            values[replica] = values.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def test_two_replicas_answer_through_one_endpoint(model_dir, cluster) -> None:
    url = deploy(model_dir, cluster, replicas=2, cpus_per_replica=1)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60)
    engine = LLMEngine(model_dir, kv_cache_memory=4 * 2**20)
    for prompt in ("The quick brown", "def add(a, b):", "Data flows one way"):
        ref = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0)
        assert out.choices[0].text == ref.text and out.usage.completion_tokens == len(ref.token_ids)
    messages = [{"role": "system", "content": SYSTEMS[0]}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=NAME, prompt="x", max_tokens=-1)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x")
    time.sleep(2.5)  # replicas push their metrics every second
    text = scrape(url)
    assert total(text, "lmfleet:num_replicas") == 2
    assert len(per_replica(text, "lmfleet:generation_tokens_total")) == 2
    assert total(text, "lmfleet:generation_tokens_total") >= 3 * 10 + 2 * 12
    status = run_cli("status", "--json")  # what `lmfleet status` prints, from Ray Serve and the replicas
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["deployments"]["LLMReplica"]["replicas"] == {"RUNNING": 2}
    assert sorted(r["replica"] for r in report["replicas"]) == sorted(per_replica(text, "lmfleet:num_requests_running"))


def test_keys_and_one_rate_limit_for_the_whole_endpoint(model_dir, cluster) -> None:
    """Two replicas behind one endpoint still allow a key its rate once, not once per replica."""
    key = "cluster-key-0123456789"
    settings = ServeSettings(NAME, api_keys=[key], rate_limit=0.2, rate_burst=2, protect_metrics=True)
    url = deploy(model_dir, cluster, replicas=2, cpus_per_replica=1, settings=settings)
    auth = {"Authorization": f"Bearer {key}"}

    def post(prompt: str, headers: dict) -> httpx.Response:
        body = {"model": NAME, "prompt": prompt, "max_tokens": 2}
        return httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)

    denied = post("a", {})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401  # --protect-metrics
    assert httpx.get(f"{url}/metrics", headers=auth, timeout=10).status_code == 200
    # Different prompts, so that the router spreads them over both replicas.
    codes = [post(prompt, auth) for prompt in ("The quick", "def add(a, b):", "Data flows one way")]
    assert [c.status_code for c in codes] == [200, 200, 429], [c.text for c in codes]
    assert codes[2].json()["error"]["code"] == "rate_limit_exceeded" and int(codes[2].headers["Retry-After"]) >= 1
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # no key needed


async def _shared_prefix_load(url: str, n: int, concurrency: int = 4) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with gate:
                body = {"model": NAME, "max_tokens": 4, "temperature": 0,
                        "messages": [{"role": "system", "content": SYSTEMS[i % 4]},
                                     {"role": "user", "content": f"question {i}"}]}
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text

        await asyncio.gather(*(one(i) for i in range(n)))


def test_prefix_affinity_beats_default_routing(model_dir, cluster, tokenizer) -> None:
    # Each replica's KV pool holds about two of the four system prompts: affinity keeps two per
    # replica cached; random routing makes every replica cycle through all four.
    prompt_blocks = -(-len(tokenizer.apply_chat_template([{"role": "system", "content": SYSTEMS[0]}],
                                                         tokenize=True)) // 16)
    engine_kwargs = {"num_blocks": 2 * prompt_blocks + 8}
    rates, shares = {}, {}
    for router in ("prefix", "pow2"):
        url = deploy(model_dir, cluster, replicas=2, cpus_per_replica=1, router=router, engine_kwargs=engine_kwargs)
        asyncio.run(_shared_prefix_load(url, 64))
        time.sleep(2.5)
        text = scrape(url)
        hits, queries = total(text, "lmfleet:prefix_cache_hits_total"), total(text, "lmfleet:prefix_cache_queries_total")
        rates[router] = hits / queries
        served = per_replica(text, "lmfleet:request_success_total")
        shares[router] = max(served.values()) / sum(served.values())
    assert rates["prefix"] > rates["pow2"] + 0.1, rates
    assert shares["prefix"] <= 0.5 + 0.25, shares  # fair share plus the imbalance allowance
    print(f"prefix-cache hit rate: affinity {rates['prefix']:.3f}, default {rates['pow2']:.3f}; "
          f"largest replica share {shares}")


def _titled_replica_pids() -> list[int]:
    """PIDs of the processes Ray titles as LLM replica actors."""
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if cmdline.startswith("ray::ServeReplica:lmfleet:LLMReplica"):
            pids.append(proc.pid)
    return pids


def _replica_pids(expected: int) -> list[int]:
    """PIDs of the live replicas as `lmfleet status` reports them (each replica reports its own;
    Ray's state API needs the dashboard, which lmfleet does not start), checked against the
    processes Ray titles as replicas."""
    from lmfleet.cluster.ray_serve import cluster_status

    deadline = time.monotonic() + 30
    while True:
        pids = sorted(r["pid"] for r in cluster_status()["replicas"] if r["age_s"] < 2)
        if len(pids) == expected or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert pids == sorted(_titled_replica_pids()), pids
    return pids


def test_killing_a_replica_under_load_loses_no_request(model_dir, cluster) -> None:
    url = deploy(model_dir, cluster, replicas=2, cpus_per_replica=1)
    pids = _replica_pids(2)

    async def load() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(i: int) -> int:
                body = {"model": NAME, "prompt": f"request {i}", "max_tokens": 40, "temperature": 0,
                        "ignore_eos": True}
                return (await client.post(f"{url}/v1/completions", json=body)).status_code

            tasks = [asyncio.create_task(one(i)) for i in range(50)]
            await asyncio.sleep(1.0)
            os.kill(pids[0], signal.SIGKILL)
            return await asyncio.gather(*tasks)

    killed_at = time.monotonic()
    codes = asyncio.run(load())
    assert codes.count(200) == 50, codes
    from lmfleet.cluster.ray_serve import replica_status

    deadline = time.monotonic() + 90
    while True:
        states = replica_status()["deployments"]["LLMReplica"]["replicas"]
        healthy = httpx.get(f"{url}/health", timeout=5).status_code == 200
        if states.get("RUNNING") == 2 and healthy and pids[0] not in _titled_replica_pids():
            break
        assert time.monotonic() < deadline, states
        time.sleep(0.5)
    print(f"replica killed: 0 of 50 requests failed; 2 replicas running again after "
          f"{time.monotonic() - killed_at:.1f} s")


def test_a_stream_cut_after_its_first_token_ends_with_an_error_event(model_dir, cluster) -> None:
    url = deploy(model_dir, cluster, replicas=1, cpus_per_replica=1)
    (pid,) = _replica_pids(1)
    body = {"model": NAME, "prompt": "The", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    events = []
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[len("data: "):])
            if len(events) == 3:
                os.kill(pid, signal.SIGKILL)
    assert time.monotonic() - started < 60  # ended, not hung
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == "replica_failed"
    assert all("choices" in json.loads(e) for e in events[:3])


def test_request_timeout_gives_504_and_frees_the_replica(model_dir, cluster) -> None:
    url = deploy(model_dir, cluster, replicas=1, cpus_per_replica=1, request_timeout_s=0.5)
    body = {"model": NAME, "prompt": "The", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as stream:
        events = [line[len("data: "):] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
    # Both requests were aborted on the replica: nothing left running, fewer tokens than asked made.
    time.sleep(3)
    text = scrape(url)
    assert total(text, "lmfleet:num_requests_running") == 0 and total(text, "lmfleet:kv_cache_usage_perc") == 0
    assert total(text, "lmfleet:generation_tokens_total") < 2 * 480


def test_autoscaling_up_under_load_and_down_when_idle(model_dir, cluster) -> None:
    from lmfleet.cluster.ray_serve import replica_status

    url = deploy(model_dir, cluster, autoscale=(1, 3), cpus_per_replica=0.5, target_ongoing_requests=1,
                 upscale_delay_s=1, downscale_delay_s=4)

    def running() -> int:
        return replica_status()["deployments"]["LLMReplica"]["replicas"].get("RUNNING", 0)

    assert running() == 1

    async def sustained_load() -> int:
        """12 clients sending long requests back to back until a second replica runs (60 s at most)."""
        peak, stop = 1, asyncio.Event()
        async with httpx.AsyncClient(timeout=180) as client:
            body = {"model": NAME, "prompt": "The", "max_tokens": 200, "temperature": 0, "ignore_eos": True}

            async def worker() -> None:
                while not stop.is_set():
                    assert (await client.post(f"{url}/v1/completions", json=body)).status_code == 200

            workers = [asyncio.create_task(worker()) for _ in range(12)]
            deadline = time.monotonic() + 60
            while peak < 2 and time.monotonic() < deadline:
                peak = max(peak, running())
                await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
        return peak

    peak = asyncio.run(sustained_load())
    assert peak >= 2, "no scale-up under 12 clients sending long requests"
    deadline = time.monotonic() + 90
    while running() > 1:
        assert time.monotonic() < deadline, "never scaled back down"
        time.sleep(1)
    print(f"autoscaling: 1 -> {peak} replicas under load, back to 1 when idle")
