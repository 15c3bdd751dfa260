"""lmfleet's Transformer vs Hugging Face transformers on the same weights: agreement and speed.

Measures, for one model flavor on one device and dtype:
  * logits agreement (max abs diff, top-1 agreement) on a batch,
  * prefill forward time (batch x prompt length),
  * single-sequence greedy decode with a KV cache (lmfleet's `generate` vs HF `generate`),
and prints ratios lmfleet / HF measured in the same run.

    python benchmarks/model_vs_hf.py --flavor small --device cpu --dtype fp32
    python benchmarks/model_vs_hf.py --flavor small --device cuda --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time

import torch
import transformers

from lmfleet.model import ModelConfig, build_model, generate, load_model, save_model
from lmfleet.model.checkpoint import parse_dtype


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    dtype = parse_dtype(args.dtype)
    config = ModelConfig.from_flavor(args.flavor)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(build_model(config, seed=0), tmp)
        ours = load_model(tmp, dtype=dtype, device=args.device)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(args.device).eval()

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (args.batch, args.prompt_len), generator=gen).to(args.device)
    with torch.inference_mode():
        ref, got = hf(x).logits.float(), ours(x).float()
        max_diff = (ref - got).abs().max().item()
        top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
        t_hf = _time(lambda: hf(x), args.device, args.repeats)
        t_ours = _time(lambda: ours(x), args.device, args.repeats)

        prompt = x[0].tolist()
        n = args.decode_tokens

        def hf_decode():
            return hf.generate(x[:1], max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                               pad_token_id=0)

        def our_decode():
            return list(generate(ours, prompt, max_new_tokens=n))

        same_tokens = hf_decode()[0, len(prompt):].tolist() == our_decode()
        d_hf = _time(hf_decode, args.device, max(1, args.repeats // 2))
        d_ours = _time(our_decode, args.device, max(1, args.repeats // 2))

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "machine": f"{device_name}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}",
        "flavor": args.flavor, "params_M": round(config.num_params() / 1e6, 1), "device": args.device,
        "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "prompt_len": args.prompt_len,
        "logits_max_abs_diff": max_diff, "top1_agreement": top1, "greedy_tokens_identical": same_tokens,
        "prefill_ms": {"lmfleet": t_ours * 1e3, "hf": t_hf * 1e3, "ratio_hf_over_lmfleet": t_hf / t_ours},
        "decode_tok_s": {"lmfleet": n / d_ours, "hf": n / d_hf, "ratio_lmfleet_over_hf": d_hf / d_ours},
    }
    print(f"machine: {result['machine']}")
    print(f"model: {args.flavor} ({result['params_M']}M params), {args.device}, {result['dtype']}")
    print(f"logits max |diff| vs HF: {max_diff:.2e}; top-1 agreement {top1:.4f}; "
          f"greedy {n} tokens identical: {same_tokens}")
    print(f"{'measure':<34}{'lmfleet':>12}{'HF':>12}{'speed-up':>10}")
    print(f"{f'prefill {args.batch}x{args.prompt_len} (ms)':<34}{t_ours * 1e3:>12.2f}{t_hf * 1e3:>12.2f}"
          f"{t_hf / t_ours:>9.2f}x")
    print(f"{'greedy decode, batch 1 (tok/s)':<34}{n / d_ours:>12.1f}{n / d_hf:>12.1f}{d_hf / d_ours:>9.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
