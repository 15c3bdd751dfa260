"""The HTTP server's cost: the same requests through `lmfleet serve` (measured with
`lmfleet bench serve`'s client) and through `LLMEngine` in process, one run; plus TTFT/TPOT at
several concurrencies.

    python benchmarks/serve_overhead.py --tokenizer runs/bench/corpus-stdlib-32000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch
from common import free_port, wait_healthy

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.engine.bench import synthetic_requests
from lmfleet.model import ModelConfig, build_model, load_tokenizer, save_model
from lmfleet.serve.bench import BenchConfig, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json (vocab = the flavor's)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--input-len", default="32:128")
    parser.add_argument("--output-len", default="32:64")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.tokenizer)
    config = ModelConfig.from_flavor(args.flavor, vocab_size=tokenizer.vocab_size)
    in_lo, in_hi = map(int, args.input_len.split(":"))
    out_lo, out_hi = map(int, args.output_len.split(":"))
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)
    kv = "256MiB"
    tmp = tempfile.mkdtemp()
    save_model(build_model(config, seed=0), tmp, tokenizer=tokenizer)

    # In process: every request submitted at once, `top` decoded together at most.
    requests = synthetic_requests(args.num_prompts, (in_lo, in_hi), (out_lo, out_hi), (100, 1000), seed=0)
    engine = LLMEngine(tmp, max_num_seqs=top, kv_cache_memory=256 * 2**20, enable_prefix_caching=False)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    engine.generate([p for p, _ in requests[:4]], params[:4])  # warm-up
    start = time.perf_counter()
    outs = engine.generate([p for p, _ in requests], params)
    in_process = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
    del engine

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-c", "from lmfleet.cli import main; main()", "serve", tmp,
                               "--port", str(port), "--max-num-seqs", str(top), "--kv-cache-memory", kv,
                               "--no-prefix-caching", "--log-level", "warning"])
    try:
        wait_healthy(url)
        results = {}
        for level in levels:
            cfg = BenchConfig(url, args.num_prompts if level > 1 else max(8, args.num_prompts // 8), level,
                              None, "random", (in_lo, in_hi), (out_lo, out_hi), token_range=(100, 1000))
            asyncio.run(run_benchmark(BenchConfig(url, 4, 4, None, "random", (in_lo, in_hi), (out_lo, out_hi))))
            results[level] = asyncio.run(run_benchmark(cfg))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    http = results[top]["output_token_throughput"]
    summary = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "flavor": args.flavor,
               "in_process_output_tok_s": in_process, f"http_output_tok_s_at_{top}": http,
               "ratio": http / in_process, "levels": results}
    print(f"model {args.flavor} ({config.num_params() / 1e6:.1f}M), {args.num_prompts} requests, "
          f"in {args.input_len} / out {args.output_len} tokens")
    for level, r in results.items():
        print(f"  concurrency {level:>3}: {r['output_token_throughput']:8.1f} out tok/s, "
              f"TTFT median {r['ttft_s']['median'] * 1e3:7.1f} ms p99 {r['ttft_s']['p99'] * 1e3:7.1f} ms, "
              f"TPOT median {r['tpot_s']['median'] * 1e3:6.1f} ms, failed {r['failed']}")
    print(f"in process (LLMEngine, {top} at once): {in_process:.1f} out tok/s; "
          f"HTTP at concurrency {top} / in process = {http / in_process:.2f}x (goal >= 0.9)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
