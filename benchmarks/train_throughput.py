"""Training throughput: `lmfleet train` vs a minimal hand-written PyTorch loop on the same model.

In one run, on one machine:
  1. lmfleet's trainer, one process (in-process, no launcher): tokens/s and MFU from metrics.jsonl;
  2. a nanoGPT-style loop (random windows from the same token shard, AdamW, clipping) on the same
     model, batch, precision and threads: tokens/s;
  3. (CPU, unless --skip-multiproc) `lmfleet train --nproc 2`: 2 processes x 1 thread, same global
     batch, against 1 process x all threads;
  4. (CPU, unless --skip-multiproc) gloo all-reduce bandwidth of a 40 MB tensor between 2 processes.

    python benchmarks/train_throughput.py                       # CPU, small model
    python benchmarks/train_throughput.py --precision bf16 --compile --skip-multiproc   # CUDA
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmfleet.data.corpus import Corpus, prepare_corpus
from lmfleet.model import ModelConfig, build_model
from lmfleet.train import LaunchSpec, TrainConfig, launch
from lmfleet.train.metrics import read_metrics
from lmfleet.train.trainer import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def lmfleet_config(args, corpus: Path, out: Path, micro_batch: int) -> TrainConfig:
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    config = TrainConfig.from_dict({
        "model": {"flavor": args.flavor, **overrides},
        "data": {"dir": str(corpus), "seq_len": args.seq_len},
        "batch": {"micro_batch": micro_batch, "grad_accum": 1},
        "schedule": {"warmup_steps": 2},
        "train": {"steps": args.steps, "precision": args.precision, "compile": args.compile, "out_dir": str(out),
                  "strategy": "ddp"},
        "eval": {"every": 0, "tokens": args.seq_len},
        "checkpoint": {"every": 0, "keep_last": 1},
    })
    return config


def steady_rate(run: Path, key: str, skip: int) -> float:
    records = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][skip:]
    return statistics.median(r[key] for r in records)


def handwritten_loop(args, corpus: Path, model_config: ModelConfig, device: torch.device) -> float:
    """nanoGPT-style: get_batch from a memmap, forward, cross-entropy, backward, clip, AdamW step."""
    data = Corpus(corpus).shards("train")[0]
    model = build_model(model_config, seed=0, device=device)
    if args.compile:
        for block in model.layers:
            block.compile()
    config = lmfleet_config(args, corpus, Path("unused"), args.micro_batch)
    optimizer = build_optimizer(model, config)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        ix = rng.integers(0, len(data) - args.seq_len - 1, args.micro_batch)
        batch = torch.from_numpy(np.stack([data[i:i + args.seq_len + 1].astype(np.int64) for i in ix])).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # the loss is read every step, as any training loop that logs does
        times.append(time.perf_counter() - start)
    return args.micro_batch * args.seq_len / statistics.median(times[args.warmup:])


def gloo_allreduce_worker(rank: int, port: int, size: int, result_path: str, reps: int = 5) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tensor = torch.ones(size // 4)
    for _ in range(2):
        dist.all_reduce(tensor)
    times = []
    for _ in range(reps):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(result_path).write_text(json.dumps({"seconds": statistics.median(times)}))
    dist.destroy_process_group()


def gloo_allreduce_seconds(size: int, reps: int = 5) -> float:
    """Median seconds of one gloo all-reduce of `size` bytes between two local processes."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.spawn(gloo_allreduce_worker, args=(port, size, f.name, reps), nprocs=2, join=True)
        return json.loads(Path(f.name).read_text())["seconds"]


def gloo_bandwidth(size: int = 40_000_000) -> float:
    return size / gloo_allreduce_seconds(size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--data", type=Path, help="corpus dir (default: a stdlib corpus with the model's vocab)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--skip-multiproc", action="store_true")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    flavor_vocab = ModelConfig.from_flavor(args.flavor).vocab_size
    corpus = args.data or ROOT / "runs" / "bench" / f"corpus-stdlib-{flavor_vocab}"
    if not (corpus / "manifest.json").is_file():
        print(f"building {corpus} (stdlib, vocab {flavor_vocab}) ...", flush=True)
        prepare_corpus(["stdlib"], corpus, vocab_size=flavor_vocab)
    result: dict = {"machine": f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}"
                    f", {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}",
                    "flavor": args.flavor, "model_set": args.model_set, "seq_len": args.seq_len,
                    "micro_batch": args.micro_batch, "precision": args.precision, "compile": args.compile}

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "one"
        config = lmfleet_config(args, corpus, run, args.micro_batch)
        launch(config, LaunchSpec())
        from lmfleet.train.trainer import build_model_config

        model_config = build_model_config(config, Corpus(corpus))
        result["params_M"] = round(model_config.num_params() / 1e6, 1)
        result["lmfleet_tok_s"] = steady_rate(run, "tokens_per_s", args.warmup)
        result["lmfleet_mfu"] = steady_rate(run, "mfu", args.warmup)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["handwritten_tok_s"] = handwritten_loop(args, corpus, model_config, device)
        result["ratio_lmfleet_over_handwritten"] = result["lmfleet_tok_s"] / result["handwritten_tok_s"]
        if not args.skip_multiproc and device.type == "cpu":
            run2 = Path(tmp) / "two"
            config2 = lmfleet_config(args, corpus, run2, args.micro_batch // 2)
            cfg_path = Path(tmp) / "two.json"
            config2.save(cfg_path)
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            cmd = [sys.executable, "-c", "import sys, json; from lmfleet.train import *; "
                   "c = TrainConfig.from_json(sys.argv[1]); launch(c, LaunchSpec(nproc=2))", str(cfg_path)]
            subprocess.run(cmd, check=True, env=env, capture_output=True)
            result["two_procs_one_thread_tok_s"] = steady_rate(run2, "tokens_per_s", args.warmup)
            result["ratio_2x1_over_1x2"] = result["two_procs_one_thread_tok_s"] / result["lmfleet_tok_s"]
            result["gloo_allreduce_40MB_GB_s"] = gloo_bandwidth() / 1e9

    print(f"machine: {result['machine']}")
    print(f"model: {args.flavor} {args.model_set or ''} ({result['params_M']}M params), batch {args.micro_batch} x "
          f"{args.seq_len}, {args.precision}, compile={args.compile}")
    print(f"lmfleet train            {result['lmfleet_tok_s']:>10,.0f} tok/s   MFU {result['lmfleet_mfu']:.3f}")
    print(f"hand-written loop        {result['handwritten_tok_s']:>10,.0f} tok/s")
    print(f"ratio lmfleet / hand     {result['ratio_lmfleet_over_handwritten']:>10.3f}   (goal >= 0.97)")
    if "two_procs_one_thread_tok_s" in result:
        print(f"2 procs x 1 thread       {result['two_procs_one_thread_tok_s']:>10,.0f} tok/s   "
              f"({result['ratio_2x1_over_1x2']:.2f}x of 1 proc x {torch.get_num_threads()} threads)")
        print(f"gloo all-reduce, 40 MB, 2 local processes: {result['gloo_allreduce_40MB_GB_s']:.2f} GB/s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
