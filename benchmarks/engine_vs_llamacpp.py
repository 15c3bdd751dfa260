"""lmfleet's engine vs llama.cpp on the GGUF export of the same weights: greedy tokens and batch-1 decode.

llama.cpp is a benchmark-only tool, never a dependency: pass the folder of its `llama-server` and
`llama-bench` binaries with --llama-bin. Greedy tokens come from llama-server (token-id prompt);
decode speed from llama-bench (`-p 0 -n N`) against lmfleet's (T(N) - T(1)) / (N - 1) per token
after a 32-token prompt, the two taking turns --repeats times, best of each.

    python benchmarks/engine_vs_llamacpp.py --flavor small --llama-bin /tmp/llama-bin
    python benchmarks/engine_vs_llamacpp.py --flavor small --llama-bin /tmp/llama-bin --vocab 151936 \\
        --model-set hidden_size=896 --model-set num_hidden_layers=24 ...      # ~0.5B, Qwen2.5-shaped
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import random_model
from llamacpp import decode_tok_s, greedy_tokens, llama_server

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.model.gguf_export import export_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory with a tokenizer (default: a random model)")
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary of the random model's tokenizer")
    parser.add_argument("--llama-bin", required=True, help="folder with llama-server and llama-bench")
    parser.add_argument("--type", default="F32", choices=["F32", "F16", "Q8_0"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--linear-method", default="auto", help="the engine's linear method (engine/linear.py)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = random_model(Path(tmp) / "model", args.flavor, args.model_set, args.vocab)
        gguf_path = export_gguf(model_dir, Path(tmp) / "model.gguf", args.type)
        engine = LLMEngine(model_dir, enable_prefix_caching=False, num_blocks=64, linear_method=args.linear_method)
        config = engine.model.config
        prompt = [(i * 7919) % (config.vocab_size - 300) + 300 for i in range(32)]

        def ours(n: int) -> tuple[float, list[int]]:
            start = time.perf_counter()
            out = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
            return time.perf_counter() - start, out.token_ids

        ours(4)
        with llama_server(args.llama_bin, gguf_path, threads, 1, 1024, "bench") as url:
            theirs_tokens = greedy_tokens(url, prompt, args.tokens)
        ours_tok_s = theirs_tok_s = 0.0
        for _ in range(args.repeats):
            full, ours_tokens = ours(args.tokens)
            ours_tok_s = max(ours_tok_s, (args.tokens - 1) / (full - ours(1)[0]))
            theirs_tok_s = max(theirs_tok_s, decode_tok_s(args.llama_bin, gguf_path, threads, args.tokens))
    agree = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), len(ours_tokens))
    machine = f"cpu, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}"
    print(f"machine: {machine}")
    print(f"model: {args.model or args.flavor} {args.model_set} ({config.num_params() / 1e6:.1f}M params), "
          f"GGUF {args.type}, lmfleet linear method {args.linear_method}")
    print(f"greedy tokens identical for the first {agree} of {args.tokens}")
    print(f"batch-1 decode: lmfleet {ours_tok_s:.1f} tok/s, llama.cpp {theirs_tok_s:.1f} tok/s, "
          f"ratio {ours_tok_s / theirs_tok_s:.2f}x (goal >= 1.0)")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"machine": machine, "model_set": args.model_set, "params_M": config.num_params() / 1e6,
                       "identical_tokens": agree, "tokens": args.tokens, "lmfleet_tok_s": ours_tok_s,
                       "llamacpp_tok_s": theirs_tok_s}, f, indent=2)


if __name__ == "__main__":
    main()
