"""The OpenAI-compatible server, driven by the official `openai` client against a real uvicorn
process (and, for limits and readiness, the app in process); answers are checked against
`LLMEngine` run directly on the same weights."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import httpx
import openai
import psutil
import pytest
import transformers
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.engine import AsyncLLMEngine, LLMEngine, SamplingParams
from lmfleet.engine.bench import synthetic_requests
from lmfleet.serve import ServeSettings, build_app

from .helpers import assert_one_line_error, chat_model_dir, free_port, run_cli

pytestmark = pytest.mark.integration

KEY = "test-key-0123456789"
NAME = "tiny-chat"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return chat_model_dir(tmp_path_factory.mktemp("serve"), tokenizer, 256, 21)


@pytest.fixture(scope="module")
def engine(model_dir):
    """The same weights in process: the reference for what the server must answer."""
    return LLMEngine(model_dir, kv_cache_memory=8 * 2**20)


@pytest.fixture(scope="module")
def grpc_port():
    return free_port()


class Server(NamedTuple):
    url: str
    proc: subprocess.Popen
    cluster: bool  # 2 replicas on a local Ray Serve behind one endpoint


@pytest.fixture(scope="module", params=["single", "cluster"])
def server(request, model_dir, grpc_port, tmp_path_factory):
    """The same `lmfleet serve` command, as one process and as 2 replicas on a local Ray Serve
    (`--replicas 2`): every test using this fixture runs against both. Stopped by SIGTERM; for the
    cluster, no process it started may be left afterwards. It is the installed `lmfleet` command,
    started outside the source tree (nothing may depend on the repository being on sys.path)."""
    cluster = request.param == "cluster"
    port = free_port()
    installed = Path(sys.executable).with_name("lmfleet")
    assert installed.is_file(), f"{installed} is missing: install the package (make install)"
    cmd = [str(installed), "serve", str(model_dir), "--port", str(port),
           "--api-key", KEY, "--served-model-name", NAME, "--kv-cache-memory", "8MiB", "--max-num-seqs", "16",
           "--max-body-bytes", "1MiB", "--log-level", "warning", "--shutdown-timeout", "30"]
    cmd += ["--replicas", "2", "--cpus-per-replica", "1"] if cluster else ["--grpc-port", str(grpc_port)]
    log = tmp_path_factory.mktemp("server-log") / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=log.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + (240 if cluster else 90)
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not become healthy:\n{log.read_text()}")
        time.sleep(0.2)
    started = psutil.Process(proc.pid).children(recursive=True)
    yield Server(url, proc, cluster)
    if proc.poll() is None:
        started += psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} for lmfleet samples (a cluster's carry a
    `replica` label; `metric` sums over labels)."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lmfleet:"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def settled(server: Server, timeout: float = 20.0) -> dict[str, float]:
    """The metrics once every finished request is in them: at once for one process; a cluster's
    replicas push theirs every half second, so scrape until two scrapes a push apart agree."""
    values = scrape(server.url)
    deadline = time.monotonic() + timeout
    while server.cluster and time.monotonic() < deadline:
        time.sleep(1.2)
        again = scrape(server.url)
        if again == values:
            break
        values = again
    return values


def metric(values: dict[str, float], name: str) -> float:
    return sum(v for k, v in values.items() if k == name or k.startswith(name + "{"))


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]


def test_greedy_completion_equals_the_engine(client, engine) -> None:
    prompt = "def add(a, b):"
    ref = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    assert out.choices[0].text == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.choices[0].finish_reason == ref.finish_reason
    # Token-id prompts and lists of prompts.
    ids = engine.tokenizer.encode(prompt)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == ref.text
    two = client.completions.create(model=NAME, prompt=[prompt, "class Point:"], max_tokens=5, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0))[0].text


def test_chat_uses_the_template_and_streams_the_same_text(client, engine) -> None:
    ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ref = engine.generate([ids], SamplingParams(max_tokens=16, temperature=0))[0]
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ids)

    stream = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reasons.append(chunk.choices[0].finish_reason)
        else:
            usage = chunk.usage
    assert text == ref.text
    assert reasons[-1] == out.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    streamed, whole = usage.model_dump(), out.usage.model_dump()
    for u in (streamed, whole):  # the second of two equal prompts may find it in the prefix cache
        assert 0 <= u.pop("prompt_tokens_details")["cached_tokens"] < u["prompt_tokens"]
    assert streamed == whole | {"completion_tokens_details": None}


def test_usage_reports_cached_prompt_tokens(server, client) -> None:
    """A prompt of 40 token ids sent twice: the second finds its two full 16-token blocks cached
    (on one server; on the cluster the router may send it to the other replica)."""
    import random

    prompt = [random.Random(time.time_ns()).randrange(5, 300) for _ in range(40)]
    first = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=NAME, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == 40
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached == 32 or (server.cluster and cached in (0, 32)), cached


def test_an_aborted_choice_is_not_reported_as_stopped() -> None:
    from lmfleet.engine.engine import CompletionOutput
    from lmfleet.serve.protocol import finish_reason

    assert finish_reason(CompletionOutput(0, [1], "a", "abort", None, None)) == "abort"
    assert finish_reason(CompletionOutput(0, [1], "a", "stop", None, None)) == "stop"


def test_seed_n_and_streaming_agree(client) -> None:
    kwargs = dict(model=NAME, prompt="The quick", max_tokens=20, temperature=1.0, top_p=0.95, seed=7, n=2,
                  extra_body={"top_k": 50, "ignore_eos": True})
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.choices[0].text != first.choices[1].text  # the two choices draw differently
    assert first.usage.completion_tokens == 40
    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert [streamed[0], streamed[1]] == [c.text for c in first.choices]


def test_stop_strings_and_logprobs(client, engine) -> None:
    ids = engine.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    full = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].text
    stop = full[5:8]
    assert len(stop) == 3 and stop in full
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"

    ref = engine.generate([ids], SamplingParams(max_tokens=6, temperature=0, logprobs=3))[0].outputs[0].logprobs
    out = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                         top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == len(ref)
    for got, want in zip(content, ref):
        assert got.logprob == pytest.approx(want["logprob"], abs=1e-5)
        assert got.token == engine.tokenizer.decode([want["token_id"]])
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in want["top"]], abs=1e-5)
    legacy = client.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, logprobs=3)
    assert legacy.choices[0].logprobs.token_logprobs == pytest.approx([e["logprob"] for e in ref], abs=1e-5)


def test_models_version_and_health(server, client) -> None:
    from importlib.metadata import version

    url = server.url
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{url}/version").json() == {"version": version("lmfleet")}  # the installed package's
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the API needs the key; health and metrics do not


def test_64_concurrent_streams_and_consistent_metrics(server) -> None:
    url = server.url
    before = settled(server)

    async def one(aclient: openai.AsyncOpenAI, i: int) -> tuple[str, dict]:
        stream = await aclient.completions.create(model=NAME, prompt=f"request {i}: def f", max_tokens=8 + i % 9,
                                                  temperature=0.7, seed=i, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage
        return text, usage

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(usage is not None for _, usage in results)
    after = settled(server)
    prompt = sum(u.prompt_tokens for _, u in results)
    completion = sum(u.completion_tokens for _, u in results)
    assert completion == sum(8 + i % 9 for i in range(64))
    assert metric(after, "lmfleet:prompt_tokens_total") - metric(before, "lmfleet:prompt_tokens_total") == prompt
    assert metric(after, "lmfleet:generation_tokens_total") - metric(before, "lmfleet:generation_tokens_total") \
        == completion
    assert metric(after, "lmfleet:request_success_total") - metric(before, "lmfleet:request_success_total") == 64
    assert metric(after, "lmfleet:time_to_first_token_seconds_count") - \
        metric(before, "lmfleet:time_to_first_token_seconds_count") == 64
    assert metric(after, "lmfleet:num_requests_running") == 0


def test_client_dropping_a_stream_frees_its_blocks(server) -> None:
    url = server.url
    before = settled(server)
    body = {"model": NAME, "prompt": "The quick brown fox", "max_tokens": 240, "stream": True, "ignore_eos": True,
            "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]  # a few events, then hang up
        assert any(line.startswith("data: {") for line in received)
        deadline = time.monotonic() + 5  # a cluster's metrics arrive within a push interval
        while metric(scrape(url), "lmfleet:kv_cache_usage_perc") == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(scrape(url), "lmfleet:kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        values = scrape(url)
        if metric(values, "lmfleet:kv_cache_usage_perc") == 0 and metric(values, "lmfleet:num_requests_running") == 0:
            break
        time.sleep(0.1)
    values = settled(server)
    assert metric(values, "lmfleet:kv_cache_usage_perc") == 0
    assert metric(values, "lmfleet:num_requests_running") == 0
    # Abandoned, not finished: the engine stopped well before the 240 tokens asked for.
    assert metric(values, "lmfleet:generation_tokens_total") - metric(before, "lmfleet:generation_tokens_total") < 240


BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [', 400, None),
    ("wrong type", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("missing messages", "/v1/chat/completions", {"model": NAME}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
     400, "messages.0.role"),
    ("negative max_tokens", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("prompt over the context", "/v1/completions", {"model": NAME, "prompt": list(range(1, 300)), "max_tokens": 1},
     400, "max_tokens"),
    ("n=0", "/v1/completions", {"model": NAME, "prompt": "x", "n": 0}, 400, "n"),
    ("temperature=-1", "/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "temperature": -1}, 400,
     "temperature"),
    ("top_p=0", "/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("token id outside the vocabulary", "/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("empty token list", "/v1/completions", {"model": NAME, "prompt": [[]]}, 400, "prompt"),
    ("echo", "/v1/completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "echo"),
    ("suffix", "/v1/completions", {"model": NAME, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("priority without --enable-priority", "/v1/completions", {"model": NAME, "prompt": "x", "priority": -9}, 400,
     "priority"),
    ("300 prompts", "/v1/completions", {"model": NAME, "prompt": ["x"] * 300, "max_tokens": 1}, 400, "prompt"),
    ("9 prompts x n=128", "/v1/completions", {"model": NAME, "prompt": ["x"] * 9, "n": 128, "max_tokens": 1}, 400,
     "n"),
    ("top_logprobs 21", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                 "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("temperature 2.5", "/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                                 "temperature": 2.5}, 400, "temperature"),
    ("1000 stop strings", "/v1/completions", {"model": NAME, "prompt": "x", "stop": [f"s{i}" for i in range(1000)]},
     400, "stop"),
    ("seed 2^64", "/v1/completions", {"model": NAME, "prompt": "x", "seed": 2**64}, 400, "seed"),
    ("logit_bias key not a token id", "/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"abc": 1}},
     400, "logit_bias"),
    ("logit_bias over 100", "/v1/completions", {"model": NAME, "prompt": "x", "logit_bias": {"5": 101}}, 400,
     "logit_bias"),
    ("logit_bias outside the vocabulary", "/v1/completions",
     {"model": NAME, "prompt": "x", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("tokenize without prompt or messages", "/tokenize", {"model": NAME}, 400, "prompt"),
    ("detokenize outside the vocabulary", "/detokenize", {"model": NAME, "tokens": [1, 10**7]}, 400, "tokens"),
    ("10 MB body", "/v1/completions", {"model": NAME, "prompt": "x" * 10_000_000}, 413, None),
    ("unknown route", "/v1/embeddings", {"model": NAME, "input": "x"}, 404, None),
]


@pytest.mark.parametrize("case,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(server, case, path, body, status, param) -> None:
    url = server.url
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}{path}", content=data, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "pydantic" not in error["message"].lower() and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    assert httpx.get(f"{url}/health").status_code == 200


def test_chunked_body_over_the_limit_gets_413(server) -> None:
    """No Content-Length to check up front: the limit (1 MiB here) holds while the body streams in."""
    def body():
        yield b'{"model": "tiny-chat", "prompt": "'
        for _ in range(24):
            yield b"x" * 65536
        yield b'"}'

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/completions", content=body(), headers=headers, timeout=30)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0000000"}, {"Authorization": KEY}],
                         ids=["no key", "wrong key", "no Bearer"])
def test_api_key_required(server, headers) -> None:
    url = server.url
    response = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x"}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_bench_serve_measures_the_server(server) -> None:
    url = server.url
    result = run_cli("bench", "serve", "--url", url, "--api-key", KEY, "--num-prompts", "8", "--concurrency", "4",
                     "--input-len-range", "4:12", "--output-len-range", "3:6", "--token-id-range", "10:300", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    expected = synthetic_requests(8, (4, 12), (3, 6), (10, 300), seed=0)
    assert summary["completed"] == 8 and summary["failed"] == 0
    assert summary["output_tokens"] == sum(n for _, n in expected)  # ignore_eos: every asked token
    assert summary["prompt_tokens"] == sum(len(p) for p, _ in expected)
    assert 0 < summary["ttft_s"]["median"] <= summary["e2e_latency_s"]["median"]
    assert summary["ttft_s"]["p99"] >= summary["ttft_s"]["median"]
    assert summary["output_token_throughput"] > 0
    # Bad settings are one-line errors; a wrong key counts as failed requests, not a crash.
    assert_one_line_error(run_cli("bench", "serve", "--url", url, "--num-prompts", "2"), "--concurrency")
    denied = run_cli("bench", "serve", "--url", url, "--api-key", "wrong-key-000000", "--model", NAME,
                     "--num-prompts", "2", "--concurrency", "2", "--token-id-range", "10:300", "--json")
    assert json.loads(denied.stdout)["failed"] == 2


@pytest.mark.parametrize("args,needle", [
    (["/no/such/model"], "/no/such/model"),
    (["MODEL", "--kv-cache-memory", "12XB"], "--kv-cache-memory"),
    (["MODEL", "--port", "0"], "--port"),
    (["MODEL", "--ssl-keyfile", "/no/key.pem"], "--ssl-certfile"),
    (["MODEL", "--api-key", "short"], "shorter than 8"),
])
def test_serve_bad_arguments_are_one_line_errors(model_dir, args, needle) -> None:


    args = [str(model_dir) if a == "MODEL" else a for a in args]
    assert_one_line_error(run_cli("serve", *args), needle)


@pytest.mark.parametrize("host,keys,warned", [
    ("127.0.0.1", [], False), ("::1", [], False), ("[::1]", [], False), ("localhost", [], False),
    ("127.0.0.2", [], False), ("0.0.0.0", [], True), ("::", [], True), ("10.1.2.3", [], True),
    ("myhost.example", [], True), ("0.0.0.0", ["k" * 16], False),
])
def test_open_server_beyond_loopback_is_warned_about(host, keys, warned) -> None:
    from lmfleet.serve.auth import open_exposure_warning

    message = open_exposure_warning(host, keys)
    assert (message is not None) == warned
    if warned:
        assert host in message and "LMFLEET_API_KEY" in message


def test_api_keys_from_flags_env_and_file(tmp_path) -> None:
    from lmfleet.errors import ConfigError
    from lmfleet.serve.auth import KeyChecker, RateLimiter, load_api_keys

    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nfile-key-00000001\n\nflag-key-00000001  # duplicate of a flag\n")
    keys = load_api_keys(["flag-key-00000001"], key_file, env={"LMFLEET_API_KEY": "env-key-0000001, env-key-0000002"})
    assert keys == ["flag-key-00000001", "env-key-0000001", "env-key-0000002", "file-key-00000001"]
    with pytest.raises(ConfigError, match="no such file"):
        load_api_keys([], tmp_path / "absent", env={})
    checker = KeyChecker(keys)
    assert checker.identify("Bearer env-key-0000002") is not None
    assert checker.identify("Bearer env-key-0000003") is None and checker.identify("env-key-0000002") is None
    assert checker.identify("Bearer flag-key-00000001") != checker.identify("Bearer file-key-00000001")
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.acquire("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("k") == pytest.approx(0.5, abs=0.05)  # one token per 0.5 s at 2 requests/s
    assert limiter.acquire("other") == 0.0  # buckets are per key


def _in_process(model_dir, **settings) -> tuple[AsyncLLMEngine, httpx.Client]:
    from fastapi.testclient import TestClient

    engine = AsyncLLMEngine(LLMEngine(model_dir, kv_cache_memory=4 * 2**20, max_num_seqs=1))
    return engine, TestClient(build_app(engine, ServeSettings(NAME, **settings)))


def test_api_docs_only_when_enabled_and_bearer_in_any_case(model_dir) -> None:
    """/docs, /redoc and /openapi.json map the whole API: off unless enable_docs. The auth scheme
    name is case-insensitive (RFC 9110), the key itself is not."""
    engine, client = _in_process(model_dir, api_keys=["s3cret"])
    try:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
        for header, status in (("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER  s3cret ", 200),
                               ("Bearer S3CRET", 401), ("Basic s3cret", 401), ("bearer", 401)):
            assert client.get("/v1/models", headers={"Authorization": header}).status_code == status, header
    finally:
        engine.shutdown()
    engine, client = _in_process(model_dir, enable_docs=True)
    try:
        assert client.get("/openapi.json").json()["info"]["title"] == "lmfleet"
        assert client.get("/docs").status_code == 200
    finally:
        engine.shutdown()


def test_priority_is_honoured_when_enabled(model_dir) -> None:
    engine, client = _in_process(model_dir, enable_priority=True)
    try:
        body = {"model": NAME, "prompt": "x", "max_tokens": 2, "priority": -9}
        assert client.post("/v1/completions", json=body).status_code == 200
    finally:
        engine.shutdown()


def test_queue_full_and_rate_limit_answer_429(model_dir) -> None:
    engine, client = _in_process(model_dir, max_queued_requests=0)
    try:
        long = {"model": NAME, "prompt": "x", "max_tokens": 150, "ignore_eos": True, "temperature": 0}
        results = {}
        first = threading.Thread(target=lambda: results.setdefault("first", client.post("/v1/completions", json=long)))
        first.start()
        deadline = time.monotonic() + 10
        while engine.num_unfinished == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = client.post("/v1/completions", json={"model": NAME, "prompt": "y", "max_tokens": 2})
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        first.join()
        assert results["first"].status_code == 200
    finally:
        engine.shutdown()

    engine, client = _in_process(model_dir, api_keys=[KEY], rate_limit=0.5, rate_burst=2)
    try:
        headers = {"Authorization": f"Bearer {KEY}"}
        codes = [client.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 1},
                             headers=headers) for _ in range(3)]
        assert [c.status_code for c in codes] == [200, 200, 429]
        assert int(codes[2].headers["Retry-After"]) >= 1
    finally:
        engine.shutdown()


def test_health_is_503_while_loading(model_dir) -> None:
    from fastapi.testclient import TestClient

    release = threading.Event()

    def slow_factory() -> AsyncLLMEngine:
        release.wait(30)
        return AsyncLLMEngine(LLMEngine(model_dir, kv_cache_memory=4 * 2**20))

    with TestClient(build_app(slow_factory, ServeSettings(NAME))) as client:
        response = client.get("/health")
        assert response.status_code == 503 and "loading" in response.json()["reason"]
        busy = client.post("/v1/completions", json={"model": NAME, "prompt": "x"})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "not_ready"
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("server", ["single"], indirect=True)  # gRPC is a single-server option
def test_grpc_streams_the_same_tokens_as_http(server, grpc_port, client, engine) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from lmfleet.serve.grpc_server import load_protos

    pb, services = load_protos()
    prompt = "def add(a, b):"
    ref = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, logprobs=2))[0]
    http = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    auth = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = services.GenerationStub(channel)
        request = pb.GenerateRequest(model=NAME, text=prompt,
                                     sampling=pb.SamplingOptions(max_tokens=12, temperature=0, logprobs=2))
        replies = list(stub.Generate(request, metadata=auth, timeout=60))
        tokens = [t for r in replies for t in r.token_ids]
        assert tokens == ref.token_ids
        assert "".join(r.text for r in replies) == http.choices[0].text == ref.text
        last = replies[-1]
        assert last.finish_reason == "length" and all(not r.finish_reason for r in replies[:-1])
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(ref.prompt_token_ids), 12)
        logprobs = [lp for r in replies for lp in r.logprobs]
        assert [lp.logprob for lp in logprobs] == pytest.approx([e["logprob"] for e in ref.outputs[0].logprobs],
                                                                abs=1e-5)
        by_ids = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ref.prompt_token_ids),
                                                  sampling=pb.SamplingOptions(max_tokens=12, temperature=0)),
                               metadata=auth, timeout=60)
        assert [t for r in by_ids for t in r.token_ids] == ref.token_ids
        assert [m.id for m in stub.Models(pb.ModelsRequest(), metadata=auth).models] == [NAME]

        with pytest.raises(grpc.RpcError) as bad:
            list(stub.Generate(pb.GenerateRequest(text=prompt, sampling=pb.SamplingOptions(top_p=1.5)),
                               metadata=auth, timeout=30))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in bad.value.details()
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.Generate(pb.GenerateRequest(sampling=pb.SamplingOptions(max_tokens=2)), metadata=auth))
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in empty.value.details()
        with pytest.raises(grpc.RpcError) as denied:
            list(stub.Generate(request, timeout=30))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unknown:
            list(stub.Generate(pb.GenerateRequest(model="gpt-9", text="x"), metadata=auth, timeout=30))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def _self_signed(directory) -> tuple[str, str]:
    """A key and a certificate for 127.0.0.1, made here (nothing downloaded)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(key_path), str(cert_path)


def test_tls_on_http_and_grpc(model_dir, tmp_path) -> None:
    import ssl

    import grpc

    from lmfleet.serve.grpc_server import load_protos

    key, cert = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=cert)
    port, gport = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from lmfleet.cli import main; main()", "serve", str(model_dir),
                             "--port", str(port), "--grpc-port", str(gport), "--ssl-keyfile", key, "--ssl-certfile",
                             cert, "--served-model-name", NAME, "--kv-cache-memory", "4MiB", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        with httpx.Client(verify=trust) as http:
            tls_client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", http_client=http, max_retries=0)
            out = tls_client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0)
            assert out.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(httpx.TransportError):  # not trusted without the certificate
            httpx.get(f"{url}/health", timeout=5)
        pb, services = load_protos()
        credentials = grpc.ssl_channel_credentials(root_certificates=open(cert, "rb").read())
        with grpc.secure_channel(f"127.0.0.1:{gport}", credentials) as channel:
            models = services.GenerationStub(channel).Models(pb.ModelsRequest(), timeout=30)
            assert [m.id for m in models.models] == [NAME]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


async def _asgi(app, method: str, path: str, body: bytes, gone: asyncio.Event) -> list[dict]:
    """One request straight through the ASGI app; the client hangs up when `gone` is set."""
    sent, messages = False, []

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    await app(scope, receive, send)
    return messages


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 200, "ignore_eos": True}),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 200,
                              "ignore_eos": True}),
], ids=["completion", "chat"])
def test_a_non_streaming_request_whose_client_left_stops_generating(model_dir, path, body) -> None:
    engine = AsyncLLMEngine(LLMEngine(model_dir, kv_cache_memory=4 * 2**20, max_num_seqs=1))
    step = engine.engine.step
    engine.engine.step = lambda: (time.sleep(0.01), step())[1]  # 200 tokens take over 2 s
    app = build_app(engine, ServeSettings(NAME))
    pool = engine.engine.block_manager

    async def main() -> list[dict]:
        gone = asyncio.Event()
        call = asyncio.create_task(_asgi(app, "POST", path, json.dumps(body).encode(), gone))
        while engine.status()["generation_tokens"] < 5:
            await asyncio.sleep(0.01)
        gone.set()  # the client hangs up mid-generation
        return await asyncio.wait_for(call, 10)

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while (engine.num_unfinished or engine.engine.has_unfinished_requests()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.num_unfinished == 0 and not engine.engine.has_unfinished_requests()
        assert engine.status()["generation_tokens"] < 100  # aborted, not run to its 200 tokens
        assert pool.num_free_blocks == pool.num_blocks  # every block back in the pool
    finally:
        engine.shutdown()


def test_serve_exits_non_zero_when_its_engine_dies(model_dir, tmp_path) -> None:
    """A dead engine loop fails what is in flight and the process exits 1 within seconds (so its
    supervisor restarts it) instead of answering 503 forever. The fault is injected by a test hook
    read once at start-up."""
    port = free_port()
    installed = Path(sys.executable).with_name("lmfleet")
    env = {**os.environ, "LMFLEET_TEST_ENGINE_FAULT_AFTER_STEPS": "3"}
    proc = subprocess.Popen([str(installed), "serve", str(model_dir), "--port", str(port), "--kv-cache-memory",
                             "4MiB", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 20, "ignore_eos": True},
                            timeout=30)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_dead"
        started = time.monotonic()
        assert proc.wait(timeout=20) == 1
        assert time.monotonic() - started < 15
        output = proc.stdout.read()
        assert "error: the engine died" in output and "Traceback" not in output, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_exits_non_zero_when_its_model_fails_to_load(model_dir, tmp_path) -> None:
    """The config reads (so the port opens) but the weights are cut short: the load thread fails
    and the process exits 1 with one line, instead of answering /health 503 for ever."""
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = subprocess.run([str(Path(sys.executable).with_name("lmfleet")), "serve", str(broken), "--port",
                             str(free_port()), "--log-level", "warning"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"the model in {broken} failed to load" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_engine_loop_that_dies_at_once_still_reports_its_death() -> None:
    """The death callback is given to the constructor, so a loop that fails before the caller's
    next line runs is still reported."""

    class Broken:
        def has_unfinished_requests(self) -> bool:
            raise RuntimeError("broken at once")

    heard = threading.Event()
    engine = AsyncLLMEngine(Broken(), on_death=lambda exc: heard.set())
    assert heard.wait(5) and "broken at once" in repr(engine.error)
    assert not engine.is_running


def test_tokenize_and_detokenize_agree_with_the_tokenizer(server, model_dir) -> None:
    """vLLM's /tokenize and /detokenize, checked against the `tokenizers` library reading the
    model's tokenizer.json directly."""
    import tokenizers

    reference = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    headers = {"Authorization": f"Bearer {KEY}"}
    text = "def fibonacci(n): 分布式 🚀"
    answer = httpx.post(f"{server.url}/tokenize", json={"model": NAME, "prompt": text}, headers=headers, timeout=30)
    assert answer.status_code == 200
    body = answer.json()
    assert body["tokens"] == reference.encode(text).ids and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 256
    plain = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False},
                       headers=headers, timeout=30).json()
    assert plain["tokens"] == reference.encode(text, add_special_tokens=False).ids
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}, headers=headers, timeout=30).json()
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert chat["tokens"] == list(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False))
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": plain["tokens"]}, headers=headers, timeout=30)
    assert back.json() == {"prompt": reference.decode(plain["tokens"], skip_special_tokens=False)} and \
        back.json()["prompt"] == text
    assert httpx.post(f"{server.url}/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401


def test_oversize_requests_are_refused_while_a_normal_one_completes(server, client) -> None:
    """Every hostile size at once, next to an ordinary request: each gets its 4xx, the ordinary
    request its full answer."""
    headers = {"Authorization": f"Bearer {KEY}"}
    hostile = [{"model": NAME, "prompt": "x", "n": 1_000_000},
               {"model": NAME, "prompt": ["x"] * 100_000, "max_tokens": 1},
               {"model": NAME, "prompt": "x", "stop": ["s"] * 1000},
               {"model": NAME, "prompt": "x", "seed": 2**64},
               {"model": NAME, "prompt": "x", "priority": -100}]

    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
            normal = client.completions.create  # the openai client, on a thread
            jobs = [asyncio.to_thread(normal, model=NAME, prompt="The quick brown fox", max_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})]
            jobs += [http.post("/v1/completions", json=body) for body in hostile]
            return await asyncio.gather(*jobs)

    completion, *refused = asyncio.run(main())
    assert completion.usage.completion_tokens == 12
    assert [r.status_code for r in refused] == [400] * len(hostile), [r.text[:200] for r in refused]
    assert [r.json()["error"]["param"] for r in refused] == ["n", "prompt", "stop", "seed", "priority"]
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_bench_serve_counts_a_stream_without_done_as_failed() -> None:
    """A stream that stops before `data: [DONE]` (a server that died mid-answer) is a failed
    request in `lmfleet bench serve`, however much text it carried."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from lmfleet.serve.bench import BenchConfig, run_benchmark

    class Truncating(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            complete = self.server.calls % 2 == 0  # every other stream is cut short
            self.server.calls += 1
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(3):
                chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if complete:
                usage = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}
                self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.wfile.flush()

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    httpd.calls = 0
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        cfg = BenchConfig(f"http://127.0.0.1:{httpd.server_port}", num_prompts=6, concurrency=1, model="m",
                          input_len=(4, 4), output_len=(3, 3), token_range=(10, 20))
        summary = asyncio.run(run_benchmark(cfg))
    finally:
        httpd.shutdown()
    assert (summary["completed"], summary["failed"]) == (3, 3)
    assert summary["first_errors"] == ["the stream ended without [DONE]"] * 3


def test_sigterm_lets_the_running_request_finish_then_exits_0(server) -> None:
    """Last test of the module: it stops the shared server."""
    url, proc = server.url, server.proc
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    result = {}

    def long_request() -> None:
        stream = client.completions.create(model=NAME, prompt="The", max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        text, reason = "", None
        for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        result["reason"] = reason

    worker = threading.Thread(target=long_request)
    worker.start()
    deadline = time.monotonic() + 10
    while metric(scrape(url), "lmfleet:num_requests_running") == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker.is_alive(), "the request ended before SIGTERM: nothing was tested"
    os.kill(proc.pid, signal.SIGTERM)
    worker.join(timeout=60)
    assert result.get("reason") == "length"  # all 200 tokens arrived
    assert proc.wait(timeout=30) == 0


def test_an_error_event_mid_stream_is_counted_as_a_server_error(model_dir) -> None:
    """A stream that had started when the engine died ends with an error event (its HTTP status was
    already 200): /metrics counts it under the status the same failure gets before a stream starts
    (503, engine_dead), so the error-rate alert sees it."""
    engine, client = _in_process(model_dir)
    step, calls = engine.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("injected engine fault")
        return step()

    engine.engine.step = failing_step
    try:
        with client.stream("POST", "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 50,
                                                            "ignore_eos": True, "stream": True}) as answer:
            assert answer.status_code == 200
            events = [line.removeprefix("data: ") for line in answer.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[0])["choices"][0]["text"] is not None  # tokens came before the fault
        assert json.loads(events[-2])["error"]["code"] == "engine_dead" and events[-1] == "[DONE]"
        errors = {s.labels["status"]: s.value for f in text_string_to_metric_families(client.get("/metrics").text)
                  for s in f.samples if s.name == "lmfleet:http_errors_total"}
        assert errors == {"503": 1.0}, errors
    finally:
        engine.shutdown()
