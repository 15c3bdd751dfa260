"""Where an engine step's time goes: a torch.profiler table (host and device) and the Python
functions with the most own time, for N concurrent requests on the given flavor.

    python benchmarks/profile_engine.py --flavor small --num-prompts 256 --dtype bf16
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.model import ModelConfig, build_model, save_model
from lmfleet.model.checkpoint import parse_dtype


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", default="64:512")
    parser.add_argument("--output-len", default="64:256")
    parser.add_argument("--rows", type=int, default=25, help="rows of each table")
    parser.add_argument("--sampled", action="store_true", help="temperature 0.8, top-p 0.95 (default: greedy)")
    parser.add_argument("--summary", action="store_true", help="only the timing line (no profiler tables)")
    args = parser.parse_args()

    config = ModelConfig.from_flavor(args.flavor)
    rng = random.Random(0)
    lo_in, hi_in = map(int, args.input_len.split(":"))
    lo_out, hi_out = map(int, args.output_len.split(":"))
    requests = [([rng.randrange(1, config.vocab_size) for _ in range(rng.randint(lo_in, hi_in))],
                 rng.randint(lo_out, hi_out)) for _ in range(args.num_prompts)]
    dtype = parse_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(config, seed=0), tmp)
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * \
            torch.empty(0, dtype=dtype).element_size()
        engine = LLMEngine(tmp, dtype=dtype, device=args.device, max_num_seqs=max(64, args.num_prompts),
                           enable_prefix_caching=False,
                           kv_cache_memory=int(1.2 * per_token * sum(len(p) + n + 16 for p, n in requests)))
    prompts = [p for p, _ in requests]
    sampling = dict(temperature=0.8, top_p=0.95) if args.sampled else dict(temperature=0)
    params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i, **sampling) for i, (_, n) in enumerate(requests)]
    engine.generate(prompts, params)  # warm-up

    steps = 0
    original_step = engine.step

    def counted_step():
        nonlocal steps
        steps += 1
        return original_step()

    engine.step = counted_step
    elapsed = float("inf")
    for _ in range(2):  # best of two
        steps = 0
        start = time.perf_counter()
        engine.generate(prompts, params)
        elapsed = min(elapsed, time.perf_counter() - start)
    useful = sum(n for _, n in requests)
    print(f"{args.num_prompts} requests ({'sampled' if args.sampled else 'greedy'}): {elapsed:.2f} s, {steps} steps, "
          f"{elapsed / steps * 1e3:.2f} ms/step, {useful / elapsed:,.1f} output tok/s")
    if args.summary:
        return

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.generate(prompts, params)
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows))
    if args.device == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    pr = cProfile.Profile()
    pr.enable()
    engine.generate(prompts, params)
    pr.disable()
    text = io.StringIO()
    pstats.Stats(pr, stream=text).sort_stats("tottime").print_stats(args.rows)
    print(text.getvalue())


if __name__ == "__main__":
    main()
