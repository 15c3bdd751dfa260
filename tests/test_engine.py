"""The engine against Hugging Face generate, and its block accounting against hand-counted blocks."""

from __future__ import annotations

import random
import time

import pytest
import torch
import transformers

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.errors import ConfigError
from lmfleet.model import ModelConfig, build_model, save_model

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def model_and_hf(tmp_path_factory):
    config = ModelConfig.from_flavor("debug", tie_word_embeddings=False, max_position_embeddings=256)
    model = build_model(config, seed=3)
    path = tmp_path_factory.mktemp("engine") / "model"
    save_model(model, path)
    return model, transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    prompts = [[rng.randrange(1024) for _ in range(rng.randint(2, 70))] for _ in range(16)]
    prompts[5] = prompts[2][:40] + [7, 8, 9]  # shares a prefix with another prompt
    # Two prompts that share only their second 16-token block: a parent-blind block hash would hand
    # the second one the first one's K/V for that block (computed after a different first block).
    second = [rng.randrange(1024) for _ in range(16)]
    prompts += [[rng.randrange(1024) for _ in range(16)] + second + [1, 2, 3],
                [rng.randrange(1024) for _ in range(16)] + second + [4, 5, 6]]
    return prompts


@pytest.fixture(scope="module")
def hf_greedy(model_and_hf, prompts):
    _, hf = model_and_hf
    outputs = []
    with torch.no_grad():
        for p in prompts:  # one prompt at a time: no padding effects in the reference
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
            outputs.append(out[0, len(p):].tolist())
    return outputs


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def run_to_completion(engine: LLMEngine) -> dict:
    """Step until every queued request finished: their last outputs by request id."""
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def graph_shaped(engine: LLMEngine):
    """Decode-only steps through the fixed-shape forward that CUDA graphs capture, run eagerly."""
    from lmfleet.engine.decode_graphs import DecodeGraphs

    runner = engine.runner
    runner.graphs = DecodeGraphs(runner, engine.scheduler.max_num_seqs, engine.max_model_len, capture=False)
    return runner.graphs


@pytest.mark.parametrize("settings_", [
    dict(),
    dict(enable_prefix_caching=False),
    dict(max_num_batched_tokens=24),  # chunked prefill across several steps
    dict(enable_chunked_prefill=False, max_num_batched_tokens=64),
    dict(num_blocks=10, max_num_batched_tokens=64),  # a pool this small must preempt
    dict(max_num_seqs=3, block_size=4),
], ids=["default", "no-prefix-cache", "chunked", "no-chunking", "preemption", "few-seqs-small-blocks"])
def test_greedy_matches_hf_one_at_a_time(model_and_hf, prompts, hf_greedy, settings_) -> None:
    """All prompts at once, then all again: the second wave finds every full prompt block in the
    prefix cache (when it is on), so cached prefixes are checked against HF too."""
    model, _ = model_and_hf
    engine = LLMEngine(model, **settings_)
    for wave in range(2):
        outputs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outputs] == hf_greedy, f"wave {wave}"
        assert all(o.finish_reason == "length" for o in outputs)
        assert engine.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    if "num_blocks" in settings_:  # a pool this small evicts every cached block before the second wave
        pass
    elif settings_.get("enable_prefix_caching", True):
        assert engine.block_manager.prefix_hits > 0
        assert any(o.num_cached_tokens > 0 for o in outputs)
    else:
        assert engine.block_manager.prefix_hits == 0 and engine.block_manager.prefix_queries == 0
    if "num_blocks" in settings_:
        assert engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("rows", [1, 2, 37])
def test_runner_fused_and_packed_linears_equal_the_plain_model(rows) -> None:
    """The engine's copy has q|k|v and gate|up fused and CPU-specific linears (oneDNN-packed, the
    head row-adaptive); with every bias present its logits equal the plain model's."""
    import copy

    from lmfleet.engine.linear import apply_linear_method
    config = ModelConfig.from_flavor("debug", qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=False)
    model = build_model(config, seed=7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    ids = torch.randint(0, config.vocab_size, (1, rows))
    for method in ("auto", "packed", "transposed", "dense"):
        fast = apply_linear_method(copy.deepcopy(model).fuse_projections(), method)
        assert fast.layers[0].self_attn.qkv_proj is not None and not hasattr(fast.layers[0].mlp, "up_proj")
        with torch.inference_mode():
            torch.testing.assert_close(fast(ids), model(ids), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="linear_method='int3'"):
        apply_linear_method(copy.deepcopy(model), "int3")
    # 'auto' on CPU: W^T for a one-sequence engine (matrix-vector products only), else oneDNN-packed
    one = apply_linear_method(copy.deepcopy(model).fuse_projections(), "auto", max_rows=1)
    many = apply_linear_method(copy.deepcopy(model).fuse_projections(), "auto", max_rows=8)
    assert type(one.layers[0].mlp.down_proj).__name__ == "TransposedLinear"
    assert type(many.layers[0].mlp.down_proj).__name__ == "PackedLinear"


@pytest.mark.parametrize("shaped", [False, True], ids=["eager", "graph-shaped"])
def test_sliding_window_model_matches_hf(tmp_path, shaped) -> None:
    config = ModelConfig.from_flavor("debug", model_type="mistral", sliding_window=8, tie_word_embeddings=False)
    model = build_model(config, seed=5)
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [[(i * 37 + j * 11) % 1000 for j in range(n)] for i, n in enumerate((3, 9, 20, 33))]
    engine = LLMEngine(model, max_num_batched_tokens=16, block_size=4)
    if shaped:
        graph_shaped(engine)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    with torch.no_grad():
        for p, out in zip(prompts, outputs):
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.token_ids == ref[0, len(p):].tolist()


def test_seeded_sampling_alone_equals_in_batch(model_and_hf, prompts) -> None:
    model, _ = model_and_hf
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, min_p=0.01, seed=1234,
                            repetition_penalty=1.1, presence_penalty=0.3, frequency_penalty=0.2, ignore_eos=True)
    alone = LLMEngine(model).generate([prompts[3]], params)[0].token_ids
    others = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    batch = LLMEngine(model).generate(prompts, [others] * 3 + [params] + [others] * (len(prompts) - 4))
    assert batch[3].token_ids == alone
    again = LLMEngine(model).generate([prompts[3]], SamplingParams(**{**params.__dict__, "seed": 99}))[0].token_ids
    assert again != alone


def test_logprobs_match_hf_log_softmax(model_and_hf, prompts) -> None:
    model, hf = model_and_hf
    out = LLMEngine(model).generate([prompts[0]], SamplingParams(max_tokens=5, temperature=0, logprobs=3,
                                                                 ignore_eos=True))[0]
    full = torch.tensor([prompts[0] + out.token_ids])
    with torch.no_grad():
        reference = hf(full).logits[0].log_softmax(-1)
    n = len(prompts[0])
    for i, entry in enumerate(out.outputs[0].logprobs):
        row = reference[n - 1 + i]
        assert entry["token_id"] == out.token_ids[i]
        assert abs(entry["logprob"] - row[entry["token_id"]].item()) <= 1e-4
        top_ids = [t for t, _ in entry["top"]]
        assert top_ids == row.topk(3).indices.tolist()
        assert max(abs(lp - row[t].item()) for t, lp in entry["top"]) <= 1e-4


def test_prefix_cache_reuses_blocks(model_and_hf) -> None:
    model, _ = model_and_hf
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    shared = list(range(100, 112))  # exactly 3 blocks of 4
    first = shared + [1, 2, 3]
    engine.generate([first], SamplingParams(max_tokens=1, temperature=0))
    hits_before, free_before = engine.block_manager.prefix_hits, engine.num_free_blocks
    second = shared + [9, 8, 7, 6, 5]  # 17 tokens: 3 shared blocks + 2 new blocks (5 tokens)
    engine.add_request(second, SamplingParams(max_tokens=1, temperature=0), request_id="b")
    batch = engine.scheduler.schedule()
    seq = batch.seqs[0]
    assert seq.num_cached_tokens == 12 and batch.num_new_tokens == [5]
    assert engine.block_manager.prefix_hits - hits_before == 12
    # Only the two new blocks came out of the free pool (the cached ones were free-but-cached).
    new_blocks = [b for b in seq.block_table[3:]]
    assert len(seq.block_table) == 5 and len(new_blocks) == 2
    assert free_before - engine.num_free_blocks == 5  # 3 cached blocks re-referenced + 2 fresh
    assert engine.block_manager.blocks[seq.block_table[0]].ref_count == 1


def test_stop_strings_across_tokens_and_streaming(model_and_hf, tokenizer) -> None:
    config = ModelConfig.from_flavor("debug", vocab_size=tokenizer.vocab_size)
    engine = LLMEngine(build_model(config, seed=11), tokenizer)
    base = engine.generate(["The quick brown"], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = base.text
    # A stop string made of the end of one generated token and the start of the next.
    ids = base.token_ids
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    cut = next(i for i in range(2, len(ids)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
               and len(pieces[i + 1]) - len(pieces[i]) >= 1)
    stop = pieces[cut][-2:] + pieces[cut + 1][len(pieces[cut]):][:1]
    assert stop in text
    engine.add_request("The quick brown", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]),
                       request_id="s")
    streamed, final = "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.text.startswith(streamed)
            assert stop not in out.text
            streamed = out.text
            final = out
    assert final.finished and final.finish_reason == "stop" and final.outputs[0].stop_reason == stop
    assert final.text == text[:text.index(stop)]


@pytest.mark.parametrize("prompt,params,field", [
    ([], SamplingParams(), "prompt is empty"),
    (list(range(300)), SamplingParams(max_tokens=1), "exceeds the model's context of 256 minus 300"),
    ([1, 2, 5000], SamplingParams(), "outside the vocabulary"),
])
def test_bad_requests(model_and_hf, prompt, params, field) -> None:
    engine = LLMEngine(model_and_hf[0])
    with pytest.raises(ValueError, match=field):
        engine.add_request(prompt, params)


@pytest.mark.parametrize("kwargs,field", [
    (dict(max_tokens=0), "max_tokens=0"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(temperature=-1), "temperature=-1"), (dict(n=0), "n=0"), (dict(logprobs=50), "logprobs=50"),
])
def test_bad_sampling_params(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_pool_never_leaks_over_1000_random_operations() -> None:
    model = build_model(ModelConfig.from_flavor("debug", num_hidden_layers=1), seed=0)
    engine = LLMEngine(model, num_blocks=24, block_size=4, max_num_batched_tokens=32, max_num_seqs=4)
    rng = random.Random(7)
    live: list[str] = []
    for _ in range(1000):
        op = rng.choice(["add", "add", "abort", "step", "step", "step"])
        if op == "add":
            prompt = [rng.randrange(1000) for _ in range(rng.randint(1, 40))]
            params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=rng.choice([0.0, 0.8]),
                                    n=rng.choice([1, 1, 2]), seed=rng.randrange(100))
            live.append(engine.add_request(prompt, params))
        elif op == "abort" and live:
            assert engine.abort(live.pop(rng.randrange(len(live))))
        else:
            for out in engine.step():
                if out.finished:
                    live.remove(out.request_id)
        in_use = {b for s in engine.scheduler.running for b in s.block_table}
        assert sum(b.ref_count for b in engine.block_manager.blocks) == sum(
            len(s.block_table) for s in engine.scheduler.running)
        assert engine.num_free_blocks + len(in_use) == 24
        assert not any(s.block_table for s in engine.scheduler.waiting)
    for request_id in list(live):
        engine.abort(request_id)
    assert engine.num_free_blocks == 24 and not engine.scheduler.has_unfinished()


def test_async_engine_streams_match_offline_and_abort_frees(model_and_hf, prompts, hf_greedy) -> None:
    import asyncio

    from lmfleet.engine import AsyncLLMEngine

    model, _ = model_and_hf
    engine = AsyncLLMEngine(LLMEngine(model, num_blocks=64, block_size=4))

    async def collect(prompt):
        tokens, last = [], None
        async for out in engine.generate(prompt, GREEDY):
            tokens += out.outputs[0].delta_token_ids
            last = out
        assert last.finished and tokens == last.token_ids
        timings = last.metrics
        assert timings["arrival_time"] <= timings["first_token_time"] <= timings["finished_time"]
        return tokens

    async def drop_early(prompt):
        stream = engine.generate(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        async for out in stream:
            if len(out.token_ids) >= 3:
                break
        await stream.aclose()

    async def main():
        results = await asyncio.gather(*(collect(p) for p in prompts[:6]), drop_early(prompts[7]))
        return results[:6]

    try:
        assert asyncio.run(main()) == hf_greedy[:6]
        # Aborts reach the step loop through its command queue: wait (bounded) for it to apply them.
        deadline = time.monotonic() + 5
        while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.engine.num_free_blocks == 64 and not engine.engine.has_unfinished_requests()
    finally:
        engine.shutdown()


def test_n_choices_share_the_prompt_blocks(model_and_hf) -> None:
    model, _ = model_and_hf
    engine = LLMEngine(model, block_size=4, num_blocks=64)
    prompt = [(i * 13) % 1000 for i in range(37)]
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=5,
                                                           ignore_eos=True))
    seqs = engine.requests[request_id].seqs
    engine.step()
    assert engine.scheduler.running == [seqs[0]]  # the other choices wait for the prompt to be cached
    done = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            done = out
    assert [s.num_cached_tokens for s in seqs[1:]] == [36, 36]  # 9 full blocks of the 37-token prompt
    assert len({tuple(o.token_ids) for o in done.outputs}) == 3  # each choice has its own seed
    assert engine.num_free_blocks == 64


@pytest.mark.parametrize("settings_", [
    dict(),
    dict(max_num_seqs=5, block_size=4),  # batches of 5, 4, 3.. padded to captured sizes; wide tables
    dict(num_blocks=10, max_num_batched_tokens=64),  # preemption between graph-shaped steps
], ids=["default", "padded-batches-small-blocks", "preemption"])
def test_graph_shaped_decode_matches_hf(model_and_hf, prompts, hf_greedy, settings_) -> None:
    """The fixed-shape decode that CUDA graphs capture (padded batch, padded block tables, masks
    built on the device, padding rows writing to the scratch block), run eagerly on CPU: the same
    greedy tokens as HF one prompt at a time, and every decode-only step went through it."""
    model, _ = model_and_hf
    engine = LLMEngine(model, **settings_)
    graphs = graph_shaped(engine)
    shapes, decode_steps = [], []
    forward, execute = graphs._forward, engine.runner.execute
    graphs._forward = lambda rows, width: shapes.append((rows, width)) or forward(rows, width)

    def counting_execute(meta):
        if meta.decode_only:
            decode_steps.append(meta.num_seqs)
        return execute(meta)

    engine.runner.execute = counting_execute
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == hf_greedy
    assert engine.num_free_blocks == engine.block_manager.num_blocks
    assert len(shapes) == len(decode_steps) > 0  # every decode-only step went through the fixed shape
    assert sum(rows > n for (rows, _), n in zip(shapes, decode_steps)) > 0  # some were padded
    assert {rows for rows, _ in shapes} <= set(graphs.batch_sizes)
    assert {width for _, width in shapes} <= set(graphs.block_widths)


def test_graph_buckets_cover_every_batch_and_context() -> None:
    from lmfleet.engine.decode_graphs import batch_buckets, block_buckets, bucket

    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert block_buckets(1) == [1]
    assert block_buckets(16) == [1, 2, 4, 8, 16]
    assert block_buckets(20) == [1, 2, 4, 8, 16, 20]
    for limit in (1, 5, 64, 100):
        sizes = batch_buckets(limit)
        assert all(n <= bucket(n, sizes) <= limit for n in range(1, limit + 1))


def test_cuda_graphs_need_cuda() -> None:
    from lmfleet.engine.runner import ModelRunner

    model = build_model(ModelConfig.from_flavor("debug"), seed=0)
    with pytest.raises(ValueError, match="CUDA"):
        ModelRunner(model, num_blocks=4, block_size=16, cuda_graphs=True)


def test_decodes_split_into_groups_only_when_padding_drops() -> None:
    from lmfleet.engine.attention import split_by_context

    assert split_by_context([10] * 4 + [100] * 4, max_groups=4) == [(0, 4), (4, 8)]  # 440 vs 800 padded
    assert split_by_context([90] * 4 + [100] * 4, max_groups=4) == [(0, 8)]  # 760 > 0.8 * 800
    assert split_by_context(list(range(1, 17)), max_groups=4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert split_by_context(list(range(1, 17)), max_groups=1) == [(0, 16)]
    assert split_by_context([5, 50, 500], max_groups=4) == [(0, 3)]  # fewer than 2 groups of 4 rows
    assert split_by_context([], max_groups=4) == []


class _EagerGraph:
    """Stands in for a captured CUDA graph on CPU: `replay()` runs the fixed-shape forward."""

    def __init__(self, graphs, rows, width):
        self.graphs, self.rows, self.width = graphs, rows, width
        self.logits = None

    def replay(self):
        self.logits = self.graphs._forward(self.rows, self.width)


def _fake_capture(graphs, fail_shape, captured):
    from lmfleet.engine.decode_graphs import _Graph

    def capture(rows, width):
        if (rows, width) == fail_shape:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured.append((rows, width))
        fake = _EagerGraph(graphs, rows, width)
        entry = _Graph(fake, None)
        original = fake.replay

        def replay():
            original()
            entry.logits = fake.logits

        fake.replay = replay
        graphs.graphs[(rows, width)] = entry
        return entry
    return capture


def test_a_failed_graph_capture_disables_only_that_shape(model_and_hf, prompts, hf_greedy, caplog) -> None:
    """Every shape is captured at start-up (one log line with the count); the shape whose capture
    fails runs eagerly, every other shape still replays its graph, and the tokens equal HF's."""
    import logging

    model, _ = model_and_hf
    engine = LLMEngine(model, max_num_seqs=16)
    graphs = graph_shaped(engine)
    graphs.capture = True
    captured = []
    graphs._capture = _fake_capture(graphs, (16, 8), captured)
    with caplog.at_level(logging.INFO, logger="lmfleet.engine.decode_graphs"):
        with pytest.warns(RuntimeWarning, match="16 sequences x 8 blocks failed"):
            engine.runner.capture_graphs()
    assert sorted(captured) == sorted(s for s in graphs.shapes if s != (16, 8)) and graphs.failed == {(16, 8)}
    assert f"captured {len(graphs.shapes) - 1} decode CUDA graphs" in caplog.text
    replayed, eager = [], []
    run = graphs.run
    graphs.run = lambda meta: (lambda out: (replayed if out is not None else eager).append(1) or out)(run(meta))
    outputs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outputs] == hf_greedy
    assert replayed and eager  # 9-16 sequences with 5-8 blocks ran eagerly, the rest from graphs
    assert engine.runner.graphs is graphs and len(captured) == len(graphs.shapes) - 1  # nothing recaptured




# ---- one request cannot hurt the others ------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    (dict(seed=2**64), "seed="), (dict(seed=-1), "seed=-1"), (dict(seed=2**63 - 1, n=2), "seed="),
    (dict(n=10**6), "n=1000000"), (dict(logprobs=21), "logprobs=21"), (dict(logprobs=-1), "logprobs=-1"),
    (dict(presence_penalty=2.5), "presence_penalty=2.5"), (dict(frequency_penalty=-3), "frequency_penalty=-3"),
    (dict(repetition_penalty=0), "repetition_penalty=0"), (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature=nan"), (dict(top_k=-1), "top_k=-1"),
    (dict(min_p=1.5), "min_p=1.5"), (dict(max_tokens=True), "max_tokens=True"),
    (dict(stop=["x"] * 65), "stop has 65"), (dict(stop=["x" * 2000]), "stop strings"),
    (dict(stop_token_ids=list(range(2000))), "stop_token_ids has 2000"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(priority=2**40), "priority="), (dict(ignore_eos="yes"), "ignore_eos="),
    (dict(top_k=2**70), "top_k="), (dict(repetition_penalty=1e-300), "repetition_penalty="),
    (dict(stop=5), "stop and stop_token_ids must be lists"), (dict(stop_token_ids="ab"), "must be lists"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_every_sampling_field_is_range_checked(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        SamplingParams(**kwargs)


def test_stop_none_means_no_stop_strings() -> None:
    assert SamplingParams(stop=None, stop_token_ids=None).stop == []


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-38), dict(temperature=1.0, top_p=1e-50),
                                    dict(temperature=1e-6, top_p=0.5, seed=3)], ids=str)
def test_vanishing_temperature_or_top_p_draws_the_most_likely_token(model_and_hf, prompts, hf_greedy, kwargs) -> None:
    """A temperature or nucleus that underflows in fp32 leaves one candidate, the most likely one:
    HF's greedy tokens (not the least likely token of an all-zero row)."""
    engine = LLMEngine(model_and_hf[0])
    outputs = engine.generate(prompts[:3], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **kwargs))
    assert [o.token_ids for o in outputs] == hf_greedy[:3]


def test_logprobs_beyond_a_small_vocabulary_return_every_token(tmp_path) -> None:
    engine = LLMEngine(build_model(ModelConfig.from_flavor("debug", vocab_size=12), seed=0))
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0, logprobs=20))[0]
    assert out.error is None and all(len(entry["top"]) == 12 for entry in out.outputs[0].logprobs)


def test_a_choice_that_fails_admission_takes_its_request_out_of_the_step(model_and_hf, prompts, hf_greedy) -> None:
    """Choice 1 of an n=2 request raises while being admitted, after choice 0 joined the same step:
    the whole request fails and none of its sequences runs (no K/V written through an emptied block
    table, no commit of a freed sequence); the other request gets HF's tokens."""
    model, _ = model_and_hf
    engine = LLMEngine(model, enable_prefix_caching=False)
    try_admit = engine.scheduler._try_admit

    def picky_admit(seq, *args):
        if seq.request_id == "bad" and seq.index == 1:
            raise RuntimeError("admission broke")
        return try_admit(seq, *args)

    engine.scheduler._try_admit = picky_admit
    engine.add_request(prompts[0], GREEDY, request_id="good")
    engine.add_request(prompts[1], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, n=2, seed=1),
                       request_id="bad")
    done = run_to_completion(engine)
    assert "admission broke" in done["bad"].error and done["good"].token_ids == hf_greedy[0]
    assert engine.num_free_blocks == engine.block_manager.num_blocks


def test_a_seeded_request_keeps_its_tokens_when_a_batch_mate_breaks_sampling(model_and_hf, prompts) -> None:
    """The batched draw fails after the seeded row drew its number; redrawn row by row, that row
    starts again from its generator's state before the failed attempt."""
    model, _ = model_and_hf
    seeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=42, ignore_eos=True)
    alone = LLMEngine(model).generate([prompts[0]], seeded)[0].token_ids
    engine = LLMEngine(model)
    sampler = engine.sampler

    def late_failure(logits, seqs):
        results = sampler(logits, seqs)
        if any(s.request_id == "bad" for s in seqs):
            raise RuntimeError("sampler broke after drawing")
        return results

    engine.sampler = late_failure
    engine.add_request(prompts[0], seeded, request_id="seeded")
    engine.add_request(prompts[1], GREEDY, request_id="bad")
    done = run_to_completion(engine)
    assert done["bad"].error is not None and done["seeded"].token_ids == alone


def test_a_request_that_breaks_in_the_loop_fails_alone(model_and_hf, prompts, hf_greedy) -> None:
    """Out-of-range fields smuggled past validation (set after construction) reach the engine loop:
    each such request fails with a clear error, the loop keeps running, and a concurrent greedy
    request still gets HF's tokens; so does one sent after them."""
    import asyncio

    from lmfleet.engine import AsyncLLMEngine
    from lmfleet.engine.async_engine import RequestFailedError

    model, _ = model_and_hf
    engine = AsyncLLMEngine(LLMEngine(model))
    bad_fields = [("seed", 2**64), ("top_k", "many"), ("n", 0), ("logprobs", 10**6), ("repetition_penalty", "x")]

    async def bad(name, value):
        params = SamplingParams(max_tokens=8, temperature=0.8)
        setattr(params, name, value)
        with pytest.raises(RequestFailedError, match="could not be queued") as info:
            async for _ in engine.generate(prompts[1], params):
                pass
        return str(info.value)

    async def good(prompt):
        last = None
        async for out in engine.generate(prompt, GREEDY):
            last = out
        return last.token_ids

    async def main():
        results = await asyncio.gather(good(prompts[0]), *(bad(n, v) for n, v in bad_fields))
        return results[0], results[1:], await good(prompts[2])

    try:
        first, errors, after = asyncio.run(main())
        assert first == hf_greedy[0] and after == hf_greedy[2]
        assert engine.is_running
        assert all("ConfigError" in e and name in e for e, (name, _) in zip(errors, bad_fields))
        deadline = time.monotonic() + 5
        while engine.engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.engine.num_free_blocks == engine.engine.block_manager.num_blocks
    finally:
        engine.shutdown()


def test_a_failure_while_sampling_or_finishing_one_request_fails_it_alone(model_and_hf, prompts, hf_greedy) -> None:
    """A sampler that raises whenever the batch holds a given request, and a detokenizer step that
    raises for another: those two requests end with `error`, the others get HF's tokens."""
    model, _ = model_and_hf
    engine = LLMEngine(model)
    sampler, append = engine.sampler, engine._append

    def picky_sampler(logits, seqs):
        if any(s.request_id == "bad-sample" for s in seqs):
            raise RuntimeError("sampler broke")
        return sampler(logits, seqs)

    def picky_append(seq, *args):
        if seq.request_id == "bad-finish" and seq.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")
        return append(seq, *args)

    engine.sampler, engine._append = picky_sampler, picky_append
    for i, prompt in enumerate(prompts[:4]):
        engine.add_request(prompt, GREEDY, request_id=f"good-{i}")
    engine.add_request(prompts[5], GREEDY, request_id="bad-sample")
    engine.add_request(prompts[6], GREEDY, request_id="bad-finish")
    done = run_to_completion(engine)
    assert "sampler broke" in done["bad-sample"].error and "bad byte" in done["bad-finish"].error
    assert done["bad-finish"].finish_reason == "error"
    assert [done[f"good-{i}"].token_ids for i in range(4)] == hf_greedy[:4]
    assert all(done[f"good-{i}"].error is None for i in range(4))
    assert engine.num_free_blocks == engine.block_manager.num_blocks and engine.stats["failed"] == 2


def test_generate_validates_every_prompt_before_queueing_any(model_and_hf) -> None:
    engine = LLMEngine(model_and_hf[0])
    with pytest.raises(ValueError, match="prompt 2: prompt token ids"):
        engine.generate([[1, 2], [3, 4], [5, 99999]], GREEDY)
    assert not engine.has_unfinished_requests() and not engine.scheduler.has_unfinished()


def test_shutdown_ends_every_pending_stream(model_and_hf) -> None:
    import asyncio

    from lmfleet.engine import AsyncLLMEngine, EngineDeadError

    engine = AsyncLLMEngine(LLMEngine(model_and_hf[0]))

    async def main():
        stream = engine.add_request([1, 2, 3], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        await stream.__anext__()
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=30))


# ---- exact outputs and counters ------------------------------------------------------------------

def test_streamed_logprobs_with_a_slow_consumer(model_and_hf, prompts) -> None:
    """The consumer reads each output a few steps after it was made: every delta still carries the
    logprobs of exactly its own tokens, and an output's cumulative logprobs do not grow later."""
    import asyncio

    from lmfleet.engine import AsyncLLMEngine

    model, _ = model_and_hf
    params = SamplingParams(max_tokens=16, temperature=0.7, seed=4, logprobs=2, ignore_eos=True)
    reference = LLMEngine(model).generate([prompts[4]], params)[0].outputs[0]
    engine = AsyncLLMEngine(LLMEngine(model))

    async def slow():
        outs = []
        async for out in engine.generate(prompts[4], params):
            outs.append(out)
            await asyncio.sleep(0.05)  # the engine runs ahead
        return outs

    try:
        outs = asyncio.run(slow())
    finally:
        engine.shutdown()
    deltas = [c for out in outs for c in out.outputs]
    assert [t for c in deltas for t in c.delta_token_ids] == reference.token_ids
    assert [e["token_id"] for c in deltas for e in c.delta_logprobs] == reference.token_ids
    assert [e["logprob"] for c in deltas for e in c.delta_logprobs] == [e["logprob"] for e in reference.logprobs]
    assert all(len(c.logprobs) == len(c.token_ids) for c in deltas)


def test_prefix_counters_count_each_admitted_request_once(model_and_hf) -> None:
    """A pool with room for one request at a time and two waiting: the blocked one is looked up
    again every step but counted once, when admitted."""
    model, _ = model_and_hf
    engine = LLMEngine(model, block_size=4, num_blocks=6, max_num_seqs=4)
    first, second = list(range(1, 19)), list(range(40, 57))  # 5 blocks each with their outputs
    engine.generate([first, second], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert engine.block_manager.prefix_queries == len(first) + len(second)


def test_readmitted_sequences_never_report_more_cached_tokens_than_their_prompt(model_and_hf, prompts) -> None:
    model, _ = model_and_hf
    engine = LLMEngine(model, num_blocks=10, max_num_batched_tokens=64)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert all(o.num_cached_tokens <= len(p) for o, p in zip(outputs, prompts))
    assert engine.block_manager.prefix_hits <= engine.block_manager.prefix_queries == sum(map(len, prompts))


def test_block_hashes_are_sha256_and_need_parent_and_tokens_to_match() -> None:
    import hashlib
    from array import array

    from lmfleet.engine.block_manager import BlockManager, block_hash
    from lmfleet.engine.sequence import Sequence

    tokens = (5, 6, 7, 8)
    root = hashlib.sha256(b"\0" * 32)
    root.update(array("q", tokens).tobytes())
    assert block_hash(None, tokens) == root.digest()
    assert block_hash(b"p" * 32, tokens) != block_hash(None, tokens)

    manager = BlockManager(8, 4)
    seq = Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    manager.allocate_prefix(seq)
    manager.allocate(seq, 9)
    seq.num_computed_tokens = 9
    manager.commit(seq)
    manager.deallocate(seq)
    again = Sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    manager.allocate_prefix(again)
    assert again.num_computed_tokens == 8
    manager.deallocate(again)
    # The second block's entry claims another parent: it is not a hit, though its hash is found.
    manager.blocks[manager.hash_to_block[block_hash(block_hash(None, (1, 2, 3, 4)), tokens)]].parent_hash = b"x"
    third = Sequence("c", [1, 2, 3, 4, 5, 6, 7, 8, 9], SamplingParams())
    manager.allocate_prefix(third)
    assert third.num_computed_tokens == 4


def test_n_choices_equal_single_requests_with_seed_plus_i(model_and_hf, prompts) -> None:
    model, _ = model_and_hf
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=21, n=3, ignore_eos=True)
    together = LLMEngine(model).generate([prompts[6]], params)[0]
    for i, choice in enumerate(together.outputs):
        alone = SamplingParams(**{**params.__dict__, "n": 1, "seed": 21 + i})
        assert choice.token_ids == LLMEngine(model).generate([prompts[6]], alone)[0].token_ids


def test_kv_cache_budget_and_memory_utilization() -> None:
    from lmfleet.engine.engine import kv_cache_budget

    gib = 1024**3
    # 80 GiB device at 0.9, 20 GiB in use, 3 GiB of activations at the largest step: 49 GiB left.
    assert kv_cache_budget(80 * gib, 0.9, 20 * gib, 3 * gib) == 49 * gib
    assert kv_cache_budget(80 * gib, 0.2, 20 * gib, 3 * gib) < 0
    model = build_model(ModelConfig.from_flavor("debug", num_hidden_layers=1), seed=0)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=f"gpu_memory_utilization={bad}"):
            LLMEngine(model, gpu_memory_utilization=bad)


def test_cli_generate_equals_the_engine_for_a_seed(tmp_path, tokenizer) -> None:
    import subprocess
    import sys

    config = ModelConfig.from_flavor("debug", vocab_size=tokenizer.vocab_size)
    model = build_model(config, seed=2)
    save_model(model, tmp_path, tokenizer=tokenizer)
    prompt = "The quick brown"
    expected = LLMEngine(model, tokenizer).generate([prompt], SamplingParams(
        max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=77))[0].text
    result = subprocess.run([sys.executable, "-m", "lmfleet.cli", "generate", str(tmp_path), prompt, "--max-tokens",
                             "20", "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "77"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + expected + "\n"


def test_max_model_len_is_lowered_to_what_the_kv_cache_holds(model_and_hf, caplog) -> None:
    """A KV cache that cannot hold one full-context sequence: the default context shrinks to what it
    holds (said in the log), so a request within the context is never refused for the memory; an
    explicit max_model_len that does not fit is a start-up error naming both sizes."""
    model, _ = model_and_hf
    with caplog.at_level("WARNING", logger="lmfleet.engine.engine"):
        engine = LLMEngine(model, num_blocks=5, block_size=16)
    assert engine.max_model_len == 80 and "max_model_len lowered to 80" in caplog.text
    # The whole (lowered) context, as a default max_tokens would ask: accepted and generated.
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=77, temperature=0, ignore_eos=True))
    (out,) = run_to_completion(engine).values()
    assert len(out.outputs[0].token_ids) == 77
    with pytest.raises(ConfigError, match=r"max_model_len=128 does not fit in the KV cache \(80 tokens"):
        LLMEngine(model, num_blocks=5, block_size=16, max_model_len=128)
    assert LLMEngine(model, num_blocks=5, block_size=16, max_model_len=64).max_model_len == 64


def test_logit_bias_shifts_the_model_logits(model_and_hf, prompts) -> None:
    """+100 on one token makes greedy pick it every step; -100 on the greedy token makes the
    first pick HF's second most likely token; out-of-range entries are refused by name."""
    _, hf = model_and_hf
    prompt = prompts[0]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1]
    first, second = logits.topk(2).indices.tolist()
    engine = LLMEngine(model_and_hf[0], num_blocks=32)
    params = dict(max_tokens=4, temperature=0, ignore_eos=True)
    engine.add_request(prompt, SamplingParams(**params, logit_bias={77: 100.0}), "forced")
    engine.add_request(prompt, SamplingParams(**params, logit_bias={first: -100.0}), "banned")
    engine.add_request(prompt, SamplingParams(**params), "plain")
    done = run_to_completion(engine)
    assert done["forced"].outputs[0].token_ids == [77] * 4
    assert done["plain"].outputs[0].token_ids[0] == first
    assert done["banned"].outputs[0].token_ids[0] == second
    with pytest.raises(ConfigError, match="logit_bias token ids"):
        engine.add_request(prompt, SamplingParams(logit_bias={10**6: 1.0}))
    for bad in ({1: 101.0}, {-1: 1.0}, {1: float("nan")}, {i: 1.0 for i in range(1025)}):
        with pytest.raises(ConfigError, match="logit_bias"):
            SamplingParams(logit_bias=bad)
