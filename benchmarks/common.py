"""Helpers the server benchmarks share (run them as `python benchmarks/NAME.py`, which puts this
folder on the import path)."""

from __future__ import annotations

import socket
import subprocess
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM a server this script started and wait for it; SIGKILL after `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_healthy(url: str, timeout: float = 180) -> None:
    """Until GET {url}/health answers 200; RuntimeError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never became healthy")
        time.sleep(0.25)


def bench_tokenizer(vocab_size: int, cache_dir: str = "runs/bench"):
    """A byte-level BPE of (about) `vocab_size` tokens, trained once on synthetic text and cached:
    random words over a few thousand CJK characters give the trainer enough distinct pairs to
    reach a Qwen-sized vocabulary. For benchmarks that need a GGUF export of a random model."""
    import random
    from pathlib import Path

    from lmfleet.model.tokenizer import load_tokenizer, train_bpe

    path = Path(cache_dir) / f"tokenizer-{vocab_size}"
    if (path / "tokenizer.json").is_file():
        return load_tokenizer(path)
    rng = random.Random(0)
    alphabet = [chr(0x4E00 + i) for i in range(3000)] + [chr(c) for c in range(ord("a"), ord("z") + 1)]

    def texts():
        for _ in range(400):
            yield " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(5000))

    tok = train_bpe(texts(), vocab_size=vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


def random_model(out_dir, flavor: str, model_set: list[str], vocab_size: int):
    """Save a random-weight model of `flavor` with `--model-set key=value` overrides and a
    `bench_tokenizer(vocab_size)` (a `vocab_size` override must match it) to `out_dir`; returns it."""
    import json
    from pathlib import Path

    from lmfleet.model import ModelConfig, build_model, save_model

    tok = bench_tokenizer(vocab_size)
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in model_set)}
    if overrides.get("vocab_size", tok.vocab_size) != tok.vocab_size:
        raise SystemExit(f"--model-set vocab_size={overrides['vocab_size']} differs from the tokenizer's "
                         f"{tok.vocab_size}: set the vocabulary with --vocab")
    config = ModelConfig.from_flavor(flavor, **{**overrides, "vocab_size": tok.vocab_size, "eos_token_id": tok.eos_id})
    save_model(build_model(config, seed=0), out_dir, tokenizer=tok)
    return Path(out_dir)
