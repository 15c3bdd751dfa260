"""Model parallelism on this machine: tensor-parallel inference (memory per rank, decode speed,
the all-reduce each layer adds) and training tokens/s under DP, TP, PP and DP x TP.

In one run:
  1. the engine at TP=1 and TP=2 on the same random model: rank 0's weight and KV-cache bytes
     (measured on the tensors it holds) against `lmfleet info --tp`'s count;
  2. decode tokens/s at TP=1 and TP=2, best of alternating rounds (the same greedy tokens);
  3. one gloo all-reduce of a decode step's activations and of a prefill chunk's, between two
     local processes: a TP layer adds two of them (after attention and after the MLP);
  4. `lmfleet train` for the same global batch as 1 process, DP=2, TP=2, PP=2 (1F1B) and, as two
     local "nodes" of 2, DP=2 x TP=2 (4 processes: on a 2-core machine they share the cores).

    python benchmarks/tensor_parallel.py            # CPU
    python benchmarks/tensor_parallel.py --device cuda --skip-train   # one GPU: TP=1 figures only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import free_port
from train_throughput import gloo_allreduce_seconds

from lmfleet.data.corpus import prepare_corpus, stdlib_root
from lmfleet.model import ModelConfig, build_model
from lmfleet.parallel.tensor_parallel import tp_memory
from lmfleet.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def held_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def engine_round(model, tp: int, prompts, params, kw) -> tuple[float, list, dict]:
    from lmfleet.engine import LLMEngine

    engine = LLMEngine(model, tensor_parallel_size=tp, **kw)
    try:
        runner = engine.runner.runner if tp > 1 else engine.runner
        memory = {"weights": held_bytes(runner.model),
                  "kv": runner.k_cache.numel() * runner.k_cache.element_size() * 2}
        engine.generate(prompts[:1], params)  # warm-up
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    tokens = sum(len(o.token_ids) for o in out)
    return tokens / seconds, [o.token_ids for o in out], memory


def inference(args) -> None:
    from lmfleet.engine import SamplingParams

    config = ModelConfig.from_flavor(args.flavor)
    model = build_model(config, seed=0, device=args.device)
    prompts = [[(13 * i + j) % config.vocab_size for j in range(32)] for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)
    kw = dict(num_blocks=args.num_blocks, block_size=16, max_num_seqs=args.batch)
    predicted = {tp: tp_memory(config, tp, 4, args.num_blocks * 16)[0] for tp in (1, 2)}
    print(f"model {args.flavor}: {config.num_params() / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, "
          f"hidden {config.hidden_size}; batch {args.batch}, {args.decode_tokens} tokens each; "
          f"{torch.get_num_threads()} threads")
    rates: dict[int, list[float]] = {1: [], 2: []}
    tokens: dict[int, list] = {}
    memory: dict[int, dict] = {}
    for _ in range(args.rounds):
        for tp in ((1, 2) if args.device == "cpu" else (1,)):
            rate, tokens[tp], memory[tp] = engine_round(model, tp, prompts, params, kw)
            rates[tp].append(rate)
    for tp, got in rates.items():
        if not got:
            continue
        p = predicted[tp]
        print(f"TP={tp}: rank 0 holds weights {memory_line(memory[tp])} "
              f"(info --tp says {p['weight_bytes'] / 2**20:.1f} MiB weights, {p['kv_bytes'] / 2**20:.1f} MiB KV); "
              f"decode {max(got):.1f} tok/s best of {[round(r, 1) for r in got]}")
    if rates[2]:
        print(f"TP=2 / TP=1 decode: {max(rates[2]) / max(rates[1]):.2f}x; same tokens: {tokens[1] == tokens[2]}")
    step = args.batch * config.hidden_size * 4
    chunk = 256 * config.hidden_size * 4
    for name, size in (("decode step", step), ("prefill chunk of 256 tokens", chunk)):
        seconds = gloo_allreduce_seconds(size, reps=50)
        print(f"all-reduce of a {name} ({size / 1024:.0f} KiB): {seconds * 1e6:.0f} us; a TP layer adds 2 = "
              f"{2 * seconds * 1e6:.0f} us, the model {2 * seconds * config.num_hidden_layers * 1e3:.2f} ms per step")


def memory_line(memory: dict) -> str:
    return f"{memory['weights'] / 2**20:.1f} MiB, KV cache {memory['kv'] / 2**20:.1f} MiB"


def train_runs(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="lmfleet-tp-bench-"))
    corpus = work / "corpus"
    prepare_corpus([str(stdlib_root() / "json"), str(stdlib_root() / "email")], corpus, vocab_size=2048,
                   val_fraction=0.05)
    model = ["--set", "model.hidden_size=256", "--set", "model.intermediate_size=768",
             "--set", "model.num_hidden_layers=4", "--set", "model.tie_word_embeddings=false"]
    common = [sys.executable, "-m", "lmfleet.cli", "train", str(ROOT / "configs" / "debug.toml"), "--data",
              str(corpus), "--steps", str(args.train_steps), "--checkpoint-every", "0", "--set", "eval.every=0",
              "--set", "eval.tokens=256", "--set", "data.seq_len=128", "--set", "batch.global_batch=8", *model]
    layouts = {"1 process": (["--nproc", "1", "--set", "batch.micro_batch=8"], 1),
               "DP=2": (["--nproc", "2", "--set", "batch.micro_batch=4"], 1),
               "TP=2": (["--nproc", "2", "--tp", "2", "--set", "batch.micro_batch=8"], 1),
               "PP=2 (1F1B, 4 micro-batches)": (["--nproc", "2", "--pp", "2", "--set", "batch.micro_batch=2"], 1),
               "DP=2 x TP=2 (2 nodes x 2)": (["--nproc", "2", "--tp", "2", "--set", "batch.micro_batch=4"], 2)}
    results: dict[str, list[float]] = {name: [] for name in layouts}
    for attempt in range(args.rounds):
        for index, (name, (extra, nodes)) in enumerate(layouts.items()):
            out = work / f"run-{index}-{attempt}"
            cmd = [*common, "--out", str(out), *extra]
            if nodes > 1:
                cmd += ["--nnodes", str(nodes), "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
            env = {**os.environ, "LMFLEET_RDZV_ID": out.name}
            procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for _ in range(nodes)]
            for proc in procs:
                _, err = proc.communicate(timeout=900)
                if proc.returncode:
                    raise SystemExit(f"{name} failed:\n{err[-3000:]}")
            steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"][2:]
            results[name].append(statistics.median(r["tokens_per_s"] for r in steps))
    base = max(results["1 process"])
    print(f"training, global batch 8 x 128 tokens, {args.train_steps} steps, median tok/s after 2, best of "
          f"{args.rounds} alternating rounds:")
    for name, got in results.items():
        print(f"  {name:32s} {max(got):8.0f} tok/s  ({max(got) / base:.2f}x of 1 process)  "
              f"rounds {[round(r) for r in got]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--num-blocks", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    if not args.skip_inference:
        inference(args)
    if not args.skip_train:
        train_runs(args)


if __name__ == "__main__":
    main()
