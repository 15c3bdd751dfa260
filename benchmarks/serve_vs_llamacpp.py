"""Serving against the CPU peer: `lmfleet serve` vs llama.cpp's `llama-server` (continuous batching
over as many slots as clients) on the same weights (GGUF F32 export), the same load from one client
(`lmfleet bench serve`'s load generator: token-id prompts, streamed, ignore_eos), taking turns
--repeats times per concurrency, best output tokens/s of each, with that run's TTFT.

    python benchmarks/serve_vs_llamacpp.py --model runs/quickstart/tiny/final --llama-bin /tmp/llama-bin
    python benchmarks/serve_vs_llamacpp.py --flavor small --llama-bin /tmp/llama-bin     # random weights
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from common import free_port, random_model, stop, wait_healthy
from llamacpp import llama_server

from lmfleet.model.gguf_export import export_gguf
from lmfleet.serve.bench import BenchConfig, run_benchmark


@contextmanager
def lmfleet_server(model_dir: Path, name: str, max_num_seqs: int, log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "lmfleet.cli", "serve", str(model_dir), "--port", str(port),
           "--served-model-name", name, "--max-num-seqs", str(max_num_seqs), "--dtype", "fp32",
           "--log-level", "warning"]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=180)
        yield url
    finally:
        stop(proc)
        log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory with a tokenizer (default: a random model)")
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--llama-bin", required=True, help="folder with llama-server")
    parser.add_argument("--concurrency", default="8,32")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[int, dict[str, dict]] = {c: {} for c in levels}

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = random_model(Path(tmp) / "model", args.flavor, args.model_set, args.vocab)
        gguf = export_gguf(model_dir, Path(tmp) / "model.gguf", "F32")
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        token_range = (min(300, vocab // 4), min(20000, vocab - 1))  # ordinary (non-special) ids
        slots = max(levels)
        context = slots * (args.input_len + args.output_len + 64)
        with llama_server(args.llama_bin, gguf, threads, slots, context, "bench") as llama_url, \
                lmfleet_server(model_dir, "bench", slots, Path(tmp) / "lmfleet.log") as ours_url:
            for concurrency in levels:
                def bench(url: str, concurrency: int = concurrency) -> dict:
                    cfg = BenchConfig(url, num_prompts=args.num_prompts, concurrency=concurrency, model="bench",
                                      input_len=(args.input_len, args.input_len),
                                      output_len=(args.output_len, args.output_len), token_range=token_range)
                    result = asyncio.run(run_benchmark(cfg))
                    if result["failed"] == args.num_prompts:  # some may fail (see the table), not all
                        raise SystemExit(f"{result['failed']} of {args.num_prompts} requests to {url} failed: "
                                         f"{result.get('first_errors')}")
                    return result

                bench(ours_url), bench(llama_url)  # warm-up both
                for _ in range(args.repeats):
                    for side, url in (("lmfleet", ours_url), ("llama.cpp", llama_url)):
                        run = bench(url)
                        best = results[concurrency].get(side)
                        if best is None or run["output_token_throughput"] > best["output_token_throughput"]:
                            results[concurrency][side] = run
    machine = f"cpu, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"
    print(f"machine: {machine}; model {args.model or args.flavor} {args.model_set}; {args.input_len} in / "
          f"{args.output_len} out, {args.num_prompts} requests per run, best of {args.repeats} alternating runs")
    print(f"{'concurrency':>11} {'side':>10} {'out tok/s':>10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} "
          f"{'TPOT p50 ms':>12} {'failed':>7}")
    for concurrency, sides in results.items():
        for side, r in sides.items():
            print(f"{concurrency:>11} {side:>10} {r['output_token_throughput']:>10.1f} "
                  f"{r['ttft_s']['median'] * 1e3:>12.1f} {r['ttft_s']['p99'] * 1e3:>12.1f} "
                  f"{r['tpot_s']['median'] * 1e3:>12.1f} {r['failed']:>7}")
        ratio = sides["lmfleet"]["output_token_throughput"] / sides["llama.cpp"]["output_token_throughput"]
        print(f"{concurrency:>11} {'ratio':>10} {ratio:>10.2f}x (goal >= 1.0 at equal or better TTFT)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
