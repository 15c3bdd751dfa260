"""Running llama.cpp's own binaries (`llama-server`, `llama-bench`) as a benchmark peer: never a
dependency. Build them as shared/BENCHMARK-PEERS.md says and pass their folder with --llama-bin."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
from common import free_port, stop, wait_healthy


def binary(folder: str | Path, name: str) -> str:
    path = Path(folder) / name
    if not path.is_file():
        raise SystemExit(f"{path} not found: build llama.cpp's {name} (see shared/BENCHMARK-PEERS.md)")
    return str(path)


@contextmanager
def llama_server(folder: str | Path, gguf: str | Path, threads: int, slots: int, context: int, name: str):
    """A running llama-server on 127.0.0.1 (continuous batching over `slots`); yields its URL."""
    port = free_port()
    cmd = [binary(folder, "llama-server"), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
           "-np", str(slots), "-c", str(context), "--host", "127.0.0.1", "--port", str(port), "-a", name,
           "--no-webui"]
    log = open(Path(gguf).with_suffix(".server.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        yield url
    finally:
        stop(proc, timeout=20)
        log.close()


def greedy_tokens(url: str, prompt: list[int], n: int) -> list[int]:
    """llama-server's greedy continuation of a token-id prompt."""
    response = httpx.post(f"{url}/completion", json={"prompt": prompt, "n_predict": n, "temperature": 0,
                                                      "top_k": 1, "ignore_eos": True, "return_tokens": True,
                                                      "cache_prompt": False}, timeout=300)
    response.raise_for_status()
    return response.json()["tokens"]


def decode_tok_s(folder: str | Path, gguf: str | Path, threads: int, tokens: int) -> float:
    """llama-bench's batch-1 text-generation rate (tokens/s) for `tokens` tokens."""
    result = subprocess.run([binary(folder, "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens),
                             "-t", str(threads), "-r", "1", "-o", "json"], capture_output=True, text=True,
                            check=True, env={**os.environ})
    return float(json.loads(result.stdout)[0]["avg_ts"])
