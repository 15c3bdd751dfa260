"""lmfleet's engine vs llama.cpp on the GGUF export of the same weights: greedy tokens and batch-1 decode.

llama.cpp is a benchmark-only tool, never a dependency: install `llama-cpp-python` in any Python
(see docs/benchmarks.md for the build flags this CPU needs) and pass that interpreter with
`--llama-python`; the llama.cpp side runs there in a subprocess.

    python benchmarks/engine_vs_llamacpp.py --model runs/quickstart/tiny/final --llama-python /tmp/llvenv/bin/python
    python benchmarks/engine_vs_llamacpp.py --flavor small --tokenizer runs/bench/corpus-stdlib-32000 \
        --llama-python /tmp/llvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.model import ModelConfig, build_model, load_tokenizer, save_model
from lmfleet.model.gguf_export import export_gguf

LLAMA_SIDE = textwrap.dedent("""
    import json, sys, time
    from llama_cpp import Llama
    path, prompt, n, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_batch=512, verbose=False)
    def run():
        llm.reset()
        out = []
        for tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out
    run()
    start = time.perf_counter()
    tokens = run()
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="model directory with a tokenizer")
    parser.add_argument("--flavor", default="small", help="random-init flavor when --model is not given")
    parser.add_argument("--tokenizer", type=Path, help="corpus/model dir whose tokenizer a random model gets")
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    parser.add_argument("--type", default="F32", choices=["F32", "F16", "Q8_0"])
    parser.add_argument("--prompt", default="def main():\n    ")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            tok = load_tokenizer(args.tokenizer)
            config = ModelConfig.from_flavor(args.flavor, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)
            model_dir = Path(tmp) / "model"
            save_model(build_model(config, seed=0), model_dir, tokenizer=tok)
        gguf_path = export_gguf(model_dir, Path(tmp) / "model.gguf", args.type)
        engine = LLMEngine(model_dir, enable_prefix_caching=False)
        prompt = engine.tokenizer.encode(args.prompt)
        params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
        engine.generate([prompt], params)
        start = time.perf_counter()
        ours = engine.generate([prompt], params)[0].token_ids
        ours_s = time.perf_counter() - start
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        result = subprocess.run([args.llama_python, "-c", LLAMA_SIDE, str(gguf_path), json.dumps(prompt),
                                 str(args.tokens), str(threads)], capture_output=True, text=True, env=env, check=True)
        theirs = json.loads(result.stdout.strip().splitlines()[-1])
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs["tokens"])) if a != b), len(ours))
    print(f"model: {model_dir} ({engine.model.config.num_params() / 1e6:.1f}M params), GGUF {args.type}, "
          f"{threads} threads")
    print(f"greedy tokens identical for the first {agree} of {args.tokens}")
    print(f"batch-1 decode: lmfleet {args.tokens / ours_s:.1f} tok/s, llama.cpp {args.tokens / theirs['seconds']:.1f} "
          f"tok/s, ratio {theirs['seconds'] / ours_s:.2f}x (goal >= 1.0)")


if __name__ == "__main__":
    main()
