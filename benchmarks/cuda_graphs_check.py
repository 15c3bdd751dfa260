"""CUDA graphs for decode steps against the eager engine, on one GPU, in one run.

Same weights (the `small` flavor unless overridden), same requests, two engines: the default one
(decode-only steps replay captured CUDA graphs) and one with `enforce_eager=True`. Reports
  * whether the greedy tokens are identical (fp32 by default: a padded batch changes matmul shapes,
    and bf16 kernels may round differently per shape; `--dtype bf16` reports the fraction of
    requests whose tokens are identical),
  * offline output tokens/s at N concurrent requests and batch-1 decode tokens/s, graphs vs eager,
  * how many graphs were captured and the seconds spent capturing them (in the warm-up run).

    python benchmarks/cuda_graphs_check.py --num-prompts 256 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.model import ModelConfig, build_model, save_model
from lmfleet.model.checkpoint import parse_dtype


def timed_generate(engine: LLMEngine, prompts, params) -> tuple[float, list[list[int]]]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    torch.cuda.synchronize()
    return time.perf_counter() - start, [o.token_ids for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", default="64:512")
    parser.add_argument("--output-len", default="64:256")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("CUDA graphs need a CUDA device; none is visible")

    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    config = ModelConfig.from_flavor(args.flavor, **overrides)
    rng = random.Random(0)
    lo_in, hi_in = map(int, args.input_len.split(":"))
    lo_out, hi_out = map(int, args.output_len.split(":"))
    requests = [([rng.randrange(1, config.vocab_size) for _ in range(rng.randint(lo_in, hi_in))],
                 rng.randint(lo_out, hi_out)) for _ in range(args.num_prompts)]
    prompts = [p for p, _ in requests]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    useful = sum(n for _, n in requests)
    one = SamplingParams(max_tokens=args.decode_tokens, temperature=0, ignore_eos=True)

    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "flavor": args.flavor,
                    "model_set": args.model_set, "dtype": args.dtype, "num_prompts": args.num_prompts}
    tokens = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(config, seed=0), tmp)
        for mode in ("graphs", "eager"):
            engine = LLMEngine(tmp, dtype=parse_dtype(args.dtype), device="cuda", enable_prefix_caching=False,
                               max_num_seqs=max(64, args.num_prompts), enforce_eager=mode == "eager")
            warm, _ = timed_generate(engine, prompts, params)  # graphs are captured here
            elapsed, tokens[mode] = timed_generate(engine, prompts, params)
            timed_generate(engine, [prompts[0][:32]], one)
            single, _ = timed_generate(engine, [prompts[0][:32]], one)
            graphs = engine.runner.graphs
            result[mode] = {"output_tok_s": useful / elapsed, "batch1_tok_s": args.decode_tokens / single,
                            "warmup_s": warm, "graphs_captured": len(graphs.graphs) if graphs else 0}
            print(f"{mode:>6}: {args.num_prompts} requests {useful / elapsed:,.1f} output tok/s; batch-1 "
                  f"{args.decode_tokens / single:,.1f} tok/s; warm-up run {warm:.1f} s"
                  + (f", {len(graphs.graphs)} graphs captured" if graphs else ""), flush=True)
            del engine
            torch.cuda.empty_cache()
    same = [a == b for a, b in zip(tokens["graphs"], tokens["eager"])]
    result["identical_fraction"] = sum(same) / len(same)
    result["speedup_offline"] = result["graphs"]["output_tok_s"] / result["eager"]["output_tok_s"]
    result["speedup_batch1"] = result["graphs"]["batch1_tok_s"] / result["eager"]["batch1_tok_s"]
    print(f"greedy tokens identical for {sum(same)}/{len(same)} requests; graphs / eager: offline "
          f"{result['speedup_offline']:.2f}x, batch-1 {result['speedup_batch1']:.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
