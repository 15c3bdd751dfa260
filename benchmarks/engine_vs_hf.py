"""lmfleet's engine vs Hugging Face `generate`, and batch-1 decode vs the memory-bandwidth bound.

Same weights (the `small` flavor, random init), same requests, same threads, one run:
  * offline throughput: N requests with varied prompt/output lengths; lmfleet takes them all at once
    (continuous batching); HF runs them in static batches (left-padded, every batch tried in
    sizes --hf-batches, the best reported), generating each batch's longest output; then lmfleet
    and HF's best batch size take turns --repeats times and the best run of each counts; once
    greedy, once sampled (temperature 0.8, top-p 0.95) on both sides;
  * batch-1 greedy decode tokens/s of one request, lmfleet vs HF;
  * the physical limit: memory bandwidth (a large read-only reduction, measured here) / bytes read
    per token (a copy would count its writes too and flatter the fraction).

    python benchmarks/engine_vs_hf.py                  # CPU, fp32
    python benchmarks/engine_vs_hf.py --dtype bf16     # CUDA when present
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch
import transformers

from lmfleet.engine import LLMEngine, SamplingParams
from lmfleet.model import ModelConfig, build_model, save_model
from lmfleet.model.checkpoint import parse_dtype


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth(device: str, nbytes: int = 512 * 1024**2) -> float:
    """Bytes/s read by a large read-only reduction (a sum: every byte read once, nothing written)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    a.sum()
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        a.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


SAMPLED = dict(temperature=0.8, top_p=0.95)


def hf_static(hf, requests, batch_size: int, device: str, sampled: bool = False) -> float:
    """Seconds to serve all requests in static batches of `batch_size` (longest output per batch)."""
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        group = requests[i:i + batch_size]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for row, (prompt, _) in enumerate(group):
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        new = max(n for _, n in group)
        with torch.inference_mode():
            hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                        eos_token_id=None, pad_token_id=0,
                        **(dict(do_sample=True, top_k=0, **SAMPLED) if sampled else dict(do_sample=False)))
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", default="16:128")
    parser.add_argument("--output-len", default="16:64")
    parser.add_argument("--hf-batches", default="8,16,32")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--linear-method", default="auto", help="the engine's linear method (engine/linear.py)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each, taking turns (the best is taken): offline at HF's best batch size, "
                             "and batch-1")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument("--skip-offline", action="store_true", help="batch-1 decode only (large models)")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    config = ModelConfig.from_flavor(args.flavor, **overrides)
    dtype = parse_dtype(args.dtype)
    rng = random.Random(0)
    lo_in, hi_in = map(int, args.input_len.split(":"))
    lo_out, hi_out = map(int, args.output_len.split(":"))
    requests = [([rng.randrange(1, config.vocab_size) for _ in range(rng.randint(lo_in, hi_in))],
                 rng.randint(lo_out, hi_out)) for _ in range(args.num_prompts)]
    useful = sum(n for _, n in requests)

    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(config, seed=0), tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(args.device).eval()
        # A KV cache for every request at once, and no more: HF needs the rest of the memory.
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * \
            torch.empty(0, dtype=dtype).element_size()
        kv_bytes = int(1.2 * per_token * sum(len(p) + n + 16 for p, n in requests))
        engine = LLMEngine(tmp, dtype=dtype, device=args.device, max_num_seqs=max(64, args.num_prompts),
                           linear_method=args.linear_method, enable_prefix_caching=False, kv_cache_memory=kv_bytes, enforce_eager=args.enforce_eager)

    def run_engine(sampled: bool) -> float:
        params = [SamplingParams(max_tokens=n, ignore_eos=True, seed=i, **(SAMPLED if sampled else {"temperature": 0}))
                  for i, (_, n) in enumerate(requests)]
        start = time.perf_counter()
        engine.generate([p for p, _ in requests], params)
        sync(args.device)
        return time.perf_counter() - start

    offline = {}
    for mode in ([] if args.skip_offline else ["greedy", "sampled"]):
        sampled = mode == "sampled"
        run_engine(sampled)  # warm-up (allocator, kernels)
        t_engine = run_engine(sampled)
        hf_times = {}
        for b in (int(x) for x in args.hf_batches.split(",")):
            hf_static(hf, requests[:b], b, args.device, sampled)  # warm-up at this shape
            hf_times[b] = hf_static(hf, requests, b, args.device, sampled)
        best_b = min(hf_times, key=hf_times.get)
        # Then the engine and HF's best batch size take turns, best of --repeats each.
        for _ in range(args.repeats - 1):
            t_engine = min(t_engine, run_engine(sampled))
            hf_times[best_b] = min(hf_times[best_b], hf_static(hf, requests, best_b, args.device, sampled))
        offline[mode] = {"engine_output_tok_s": useful / t_engine, "hf_best_batch": best_b,
                         "hf_output_tok_s": {b: useful / t for b, t in hf_times.items()},
                         "throughput_ratio": hf_times[best_b] / t_engine}

    prompt = requests[0][0][:32]
    n = args.decode_tokens
    one = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    engine.generate([prompt], one)
    ids = torch.tensor([prompt], device=args.device)
    with torch.inference_mode():
        hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    # Best of --repeats, the two taking turns, so that a slow moment of a shared machine hits both.
    d_engine = d_hf = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours_tokens = engine.generate([prompt], one)[0].token_ids
        sync(args.device)
        d_engine = min(d_engine, time.perf_counter() - start)
        with torch.inference_mode():
            start = time.perf_counter()
            ref = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            sync(args.device)
            d_hf = min(d_hf, time.perf_counter() - start)
    same = ref[0, len(prompt):].tolist() == ours_tokens

    bandwidth = memory_bandwidth(args.device)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    # Every weight is read once per decoded token, except an untied embedding table (one row).
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    bytes_per_token = (config.num_params() - embedding) * itemsize
    bound = bandwidth / bytes_per_token
    machine = (torch.cuda.get_device_name() if args.device == "cuda" else "cpu") + \
        f", {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {
        "machine": machine, "flavor": args.flavor, "model_set": args.model_set,
        "params_M": round(config.num_params() / 1e6, 1), "dtype": args.dtype, "device": args.device,
        "cuda_graphs": engine.runner.graphs is not None,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "offline": offline, "decode_tok_s": {"lmfleet": n / d_engine, "hf": n / d_hf}, "decode_ratio": d_hf / d_engine,
        "greedy_identical_to_hf": same, "memory_bandwidth_GB_s": bandwidth / 1e9,
        "decode_bound_tok_s": bound, "decode_fraction_of_bound": (n / d_engine) / bound,
    }
    print(f"machine: {machine}")
    print(f"model: {args.flavor} ({result['params_M']}M params), {args.dtype} on {args.device}, "
          f"CUDA graphs {'on' if result['cuda_graphs'] else 'off'}, linear method {args.linear_method}")
    for mode, row in offline.items():
        print(f"offline, {mode}, {args.num_prompts} requests (in {args.input_len}, out {args.output_len}), "
              f"output tok/s:")
        print(f"  lmfleet engine (continuous batching)   {row['engine_output_tok_s']:>10,.1f}")
        for b, tok_s in row["hf_output_tok_s"].items():
            print(f"  HF generate, static batches of {b:<3}    {tok_s:>10,.1f}")
        print(f"  ratio vs best HF                       {row['throughput_ratio']:>10.2f}x")
    print(f"batch-1 greedy decode, {n} tokens: lmfleet {n / d_engine:,.1f} tok/s, HF {n / d_hf:,.1f} tok/s, "
          f"ratio {d_hf / d_engine:.2f}x (goal >= 1.5); tokens identical: {same}")
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s / {bytes_per_token / 1e6:.0f} MB per token = bound "
          f"{bound:,.1f} tok/s; lmfleet reaches {result['decode_fraction_of_bound']:.0%} of it")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
