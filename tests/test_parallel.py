"""Tensor parallelism against one process: the same model split across 2 gloo processes gives the
logits of the unsplit model (float64, so only the order of the sums differs)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmfleet.errors import ConfigError
from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import build_model
from lmfleet.parallel.tensor_parallel import check_tp, shard_for_inference, tp_layout, tp_memory

from .helpers import chat_model_dir, serve_process

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128)
CASES = {
    "kv split (2 KV heads)": dict(vocab_size=200, num_key_value_heads=2),
    "kv replicated (1 KV head)": dict(vocab_size=200, num_key_value_heads=1),
    "biases, head replicated (odd vocabulary)": dict(vocab_size=201, num_key_value_heads=4, qkv_bias=True,
                                                      o_bias=True, mlp_bias=True),
}


def _rank(rank: int, tp: int, store: str, shape: dict, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp)
    try:
        config = ModelConfig(**BASE, **shape)
        ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
        results = {}
        for fused in (False, True):
            model = build_model(config, seed=3, dtype=torch.float64)
            if fused:  # shard, then fuse and pick linear methods as the engine does
                from lmfleet.engine.linear import apply_linear_method

                shard_for_inference(model, tp, rank)
                model.fuse_projections()
                apply_linear_method(model, "transposed")
            else:
                shard_for_inference(model, tp, rank)
            with torch.no_grad():
                results["fused" if fused else "plain"] = model(ids)
            results["params"] = sum(p.numel() for p in model.parameters())
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # neither rank tears its gloo pairs down while the other still uses them
    finally:
        dist.destroy_process_group()
    # Leave without C++ static destructors: with torch 2.13 a gloo process sometimes aborts in them
    # ("terminate called without an active exception") after everything above has finished.
    os._exit(0)


@pytest.mark.parametrize("shape", list(CASES.values()), ids=list(CASES))
def test_tensor_parallel_logits_equal_one_process(shape, tmp_path) -> None:
    config = ModelConfig(**BASE, **shape)
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    whole = build_model(config, seed=3, dtype=torch.float64)
    with torch.no_grad():
        reference = whole(ids)
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "store"), shape, str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for variant in ("plain", "fused"):
        assert got[variant].shape == reference.shape
        assert (got[variant] - reference).abs().max().item() < 1e-10, variant
    # Each rank holds its share of every split weight (the embedding, norms and an odd-sized head stay whole).
    total = sum(p.numel() for p in whole.parameters())
    assert got["params"] < total


def test_layouts_and_errors_name_the_problem() -> None:
    gqa = ModelConfig(**BASE, vocab_size=200, num_key_value_heads=1)
    assert [(lay.first_head, lay.heads, lay.first_kv_head, lay.kv_heads)
            for lay in (tp_layout(gqa, 4, r) for r in range(4))] == [(0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 0, 1),
                                                                     (3, 1, 0, 1)]
    assert tp_layout(gqa, 2, 1).kv_replicated
    split = ModelConfig(**BASE, vocab_size=200, num_key_value_heads=2)
    assert [(lay.first_kv_head, lay.kv_heads) for lay in (tp_layout(split, 2, r) for r in range(2))] == [(0, 1), (1, 1)]
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
        check_tp(split, 3)
    with pytest.raises(ConfigError, match="does not divide intermediate_size=90"):
        check_tp(ModelConfig(**(BASE | {"intermediate_size": 90}), vocab_size=200), 4)
    odd_kv = ModelConfig(**(BASE | {"num_attention_heads": 12}), head_dim=8, vocab_size=200, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 and num_key_value_heads=3: one must divide"):
        check_tp(odd_kv, 2)


def test_info_tp_gives_each_rank_its_share(tmp_path) -> None:
    """`lmfleet info --tp 2`: per-rank parameters and KV cache against a count by hand."""
    import json

    from lmfleet.model import save_model

    from .helpers import run_cli

    config = ModelConfig(**BASE, vocab_size=200, num_key_value_heads=2)
    save_model(build_model(config), tmp_path / "m")
    result = run_cli("info", str(tmp_path / "m"), "--tp", "2", "--kv-tokens", "100", "--json")
    assert result.returncode == 0, result.stderr
    ranks = json.loads(result.stdout)["tensor_parallel"]["ranks"]
    h, i, d, layers, vocab = 64, 96, 16, 2, 200
    # Per layer: q and o by heads (half each), k and v by KV heads (1 of 2), gate/up/down by
    # features (half), both norms whole; embedding and final norm whole, LM head by vocabulary.
    per_layer = 2 * (h * h // 2) + 2 * (h * d) + 3 * (h * i // 2) + 2 * h
    expected = layers * per_layer + vocab * h + h + vocab // 2 * h
    assert [r["params"] for r in ranks] == [expected, expected]
    assert [r["weight_bytes"] for r in ranks] == [4 * expected] * 2
    assert [r["kv_bytes"] for r in ranks] == [2 * layers * 1 * d * 4 * 100] * 2  # K and V, 1 head, fp32
    one = json.loads(run_cli("info", str(tmp_path / "m"), "--tp", "1", "--json").stdout)
    assert one["tensor_parallel"]["ranks"][0]["params"] == one["parameters"]
    refused = run_cli("info", str(tmp_path / "m"), "--tp", "3")
    assert refused.returncode != 0 and "tensor_parallel_size=3 does not divide num_attention_heads=4" in refused.stderr


# ---- the engine with tensor_parallel_size=2 ------------------------------------------------------

PROMPTS = [[(7 * i + j) % 200 for j in range(5 + 9 * i)] for i in range(5)]
PROMPTS += [PROMPTS[4][:30] + [i, i + 1, i + 2] for i in range(3)]  # a shared prefix: prefix-cache hits
ENGINE = dict(num_blocks=96, block_size=4, max_num_batched_tokens=16, max_num_seqs=4)  # chunked, batched


def _tp_engine(model, **kwargs):
    from lmfleet.engine import LLMEngine

    return LLMEngine(model, tensor_parallel_size=2, **ENGINE, **kwargs)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv split", "kv replicated"])
def test_engine_tp2_decodes_the_tokens_of_one_process(kv_heads) -> None:
    """Greedy tokens of 8 prompts through 4 sequence slots (continuous batching), 16-token steps
    (chunked prefill) and shared prefixes (prefix caching): equal at TP=1 and TP=2, in float64."""
    from lmfleet.engine import LLMEngine, SamplingParams

    config = ModelConfig(**BASE, vocab_size=200, num_key_value_heads=kv_heads)
    model = build_model(config, seed=0, dtype=torch.float64)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = LLMEngine(model, **ENGINE).generate(PROMPTS, params)
    engine = _tp_engine(model)
    try:
        got = engine.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in reference]
        assert sum(o.num_cached_tokens for o in got) > 0  # the prefix cache served some prompts
        # Rank 0 holds its share of the KV cache: half the heads, or the one replicated head.
        assert engine.runner.runner.k_cache.shape[2] == max(1, kv_heads // 2)
        # ... and what `lmfleet info --tp 2` says a rank holds is what rank 0's model holds.
        held = {id(t): t for t in [*engine.runner.runner.model.parameters(), *engine.runner.runner.model.buffers()]}
        assert tp_memory(config, 2, 8, 1)[0]["params"] == sum(t.numel() for t in held.values())
        workers = list(engine.runner.workers)
    finally:
        engine.shutdown()
    assert not any(w.is_alive() for w in workers)


def test_a_dead_tp_worker_ends_the_engine() -> None:
    from lmfleet.engine import SamplingParams
    from lmfleet.engine.executor import ExecutorDied

    model = build_model(ModelConfig(**BASE, vocab_size=200, num_key_value_heads=2), seed=0)
    engine = _tp_engine(model)
    try:
        worker = engine.runner.workers[0]
        os.kill(worker.pid, 9)
        worker.join(timeout=10)
        with pytest.raises(ExecutorDied, match=f"pid {worker.pid}"):
            engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
    finally:
        engine.shutdown()


def test_a_rank_0_failure_inside_a_step_ends_the_engine_not_only_the_step() -> None:
    """Once a step is sent, the workers are inside its collectives: a failure of rank 0's share
    (an out-of-memory on a big prefill) cannot be survived like one process's failed forward, or
    the next step would pair with the wrong collectives. The engine ends; the workers go."""
    from lmfleet.engine import SamplingParams
    from lmfleet.engine.executor import ExecutorDied

    model = build_model(ModelConfig(**BASE, vocab_size=200, num_key_value_heads=2), seed=0)
    engine = _tp_engine(model)
    workers = list(engine.runner.workers)
    try:
        runner = engine.runner.runner

        def fail(meta):
            raise RuntimeError("out of memory (injected)")

        runner.execute = fail
        with pytest.raises(ExecutorDied, match="rank 0 failed during a step: RuntimeError: out of memory"):
            engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(ExecutorDied):  # and stays ended
            engine.generate([[4, 5]], SamplingParams(max_tokens=2, temperature=0))
    finally:
        engine.shutdown()
    assert not any(w.is_alive() for w in workers)


def test_tp_sizes_that_do_not_fit_the_model_are_refused_before_any_process_starts() -> None:
    from lmfleet.engine import LLMEngine

    model = build_model(ModelConfig(**BASE, vocab_size=200, num_key_value_heads=2), seed=0)
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
        LLMEngine(model, tensor_parallel_size=3, **ENGINE)


def _tp_server(model_dir: Path, cwd: Path):
    """`lmfleet serve --tensor-parallel-size 2`, healthy; returns the process and its URL."""
    return serve_process(model_dir, "--tensor-parallel-size", "2", "--kv-cache-memory", "4MiB",
                         "--served-model-name", "tp", "--log-level", "warning", cwd=cwd)


def _workers(proc) -> list[psutil.Process]:
    family = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in family if "resource_tracker" not in " ".join(p.cmdline())]


def test_serve_with_tensor_parallelism_answers_and_a_dead_worker_stops_it(tokenizer, tmp_path) -> None:
    """`lmfleet serve --tensor-parallel-size 2` answers the openai client with one process's
    greedy text; SIGKILL to its worker: the next request gets a 5xx, the server exits 1 within
    seconds and leaves no process behind."""
    from lmfleet.engine import LLMEngine, SamplingParams

    model_dir = chat_model_dir(tmp_path, tokenizer, 256, 21)
    proc, url = _tp_server(model_dir, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60)
        ref = LLMEngine(model_dir, kv_cache_memory=4 * 2**20).generate(["The quick brown"],
                                                                        SamplingParams(max_tokens=12, temperature=0))
        answer = client.completions.create(model="tp", prompt="The quick brown", max_tokens=12, temperature=0)
        assert answer.choices[0].text == ref[0].text
        family = psutil.Process(proc.pid).children(recursive=True)
        workers = _workers(proc)
        assert len(workers) == 1, [p.cmdline() for p in family]
        workers[0].kill()
        failed = httpx.post(f"{url}/v1/completions", json={"model": "tp", "prompt": "x", "max_tokens": 8},
                            timeout=30)
        assert failed.status_code >= 500 and failed.json()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=20) == 1
        output = proc.stdout.read()
        assert "error: the engine died" in output and "Traceback" not in output, output
        _, alive = psutil.wait_procs(family, timeout=10)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_tp_server_killed_outright_leaves_no_worker(tokenizer, tmp_path) -> None:
    """SIGKILL to the server (rank 0): nothing of it can clean up, its worker still leaves."""
    proc, _ = _tp_server(chat_model_dir(tmp_path, tokenizer, 256, 21), tmp_path)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(_workers(proc)) == 1
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
