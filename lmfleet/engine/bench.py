"""`lmfleet bench offline`: throughput of the engine on synthetic requests (like `vllm bench throughput`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from lmfleet.engine.engine import LLMEngine
from lmfleet.engine.params import SamplingParams
from lmfleet.errors import ConfigError


def parse_range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text), int(text))
    except ValueError:
        raise ConfigError(f"{name}={text!r} should be N or A:B") from None
    if not 1 <= lo <= hi:
        raise ConfigError(f"{name}={text!r} needs 1 <= A <= B")
    return lo, hi


def synthetic_requests(num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
                       token_range: tuple[int, int], prefix_len: int = 0, num_prefixes: int = 1,
                       seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) pairs: random ids in [token_range), each prompt starting
    with one of `num_prefixes` shared prefixes of `prefix_len` tokens, then its own random part."""
    rng = random.Random(seed)
    lo, hi = token_range
    prefixes = [[rng.randrange(lo, hi) for _ in range(prefix_len)] for _ in range(max(1, num_prefixes))]
    return [(rng.choice(prefixes) + [rng.randrange(lo, hi) for _ in range(rng.randint(*input_len))],
             rng.randint(*output_len)) for _ in range(num_prompts)]


def offline_benchmark(engine: LLMEngine, num_prompts: int, input_len: tuple[int, int],
                      output_len: tuple[int, int], prefix_len: int = 0, seed: int = 0,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Submit every request at once and run the engine until all finish."""
    if num_prompts < 1 or prefix_len < 0:
        raise ConfigError(f"num_prompts={num_prompts} must be >= 1 and prefix_len={prefix_len} >= 0")
    requests = synthetic_requests(num_prompts, input_len, output_len, (0, engine.model.config.vocab_size),
                                  prefix_len, num_prefixes=1, seed=seed)
    queries, hits = engine.block_manager.prefix_queries, engine.block_manager.prefix_hits
    start = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in requests]
    done, output_tokens = 0, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done += 1
                output_tokens += len(out.token_ids)
                if progress:
                    progress(done, len(ids))
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(len(p) for p, _ in requests)
    queried = engine.block_manager.prefix_queries - queries
    return {"num_prompts": num_prompts, "elapsed_s": elapsed, "requests_per_s": num_prompts / elapsed,
            "output_tokens_per_s": output_tokens / elapsed,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "prefix_cache_hit_rate": (engine.block_manager.prefix_hits - hits) / queried if queried else 0.0,
            "preemptions": engine.scheduler.num_preemptions}


def decode_speed(engine: LLMEngine, batch: int, tokens: int = 32, prompt_len: int = 16,
                 rounds: int = 2) -> float:
    """Decode tokens per second of `batch` sequences generating together (best of `rounds`): the
    time of `tokens` new tokens less that of the first one (prefill), over batch x (tokens - 1)."""
    if batch < 1 or tokens < 2:
        raise ConfigError(f"batch={batch} must be >= 1 and tokens={tokens} >= 2")
    vocab = engine.model.config.vocab_size
    prompts = [[(7 + 31 * i + 13 * j) % vocab for j in range(prompt_len)] for i in range(batch)]

    def timed(n: int) -> float:
        start = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return time.perf_counter() - start

    timed(2)  # warm-up: first calls allocate and pack
    best = 0.0
    for _ in range(rounds):
        first, whole = timed(1), timed(tokens)
        best = max(best, batch * (tokens - 1) / max(whole - first, 1e-9))
    return best
