"""`lmfleet bench serve` against an independent client, guidellm, on the same server and load:
TTFT, ITL and throughput from both, side by side, best of alternating rounds.

guidellm runs from its own venv (never an lmfleet dependency):

    python -m venv /tmp/gl && /tmp/gl/bin/pip install guidellm
    python benchmarks/serve_vs_guidellm.py --model-dir runs/quickstart/tiny/final --guidellm /tmp/gl/bin/guidellm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, wait_healthy

from lmfleet.serve.bench import BenchConfig, run_benchmark


def ours(url: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = BenchConfig(url, num_prompts=args.num_prompts, concurrency=args.concurrency, model="bench",
                      input_len=(args.prompt_tokens, args.prompt_tokens),
                      output_len=(args.output_tokens, args.output_tokens), token_range=(100, 4000))
    s = asyncio.run(run_benchmark(cfg))
    if s["failed"]:
        raise SystemExit(f"lmfleet bench serve: {s['failed']} requests failed: {s.get('first_errors')}")
    return {"ttft_median_ms": s["ttft_s"]["median"] * 1e3, "ttft_mean_ms": s["ttft_s"]["mean"] * 1e3,
            "itl_median_ms": s["itl_s"]["median"] * 1e3, "itl_mean_ms": s["itl_s"]["mean"] * 1e3,
            "output_tok_s": s["output_token_throughput"], "requests_s": s["request_throughput"]}


def theirs(url: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [args.guidellm, "run", "--backend", f"kind=openai_http,target={url},model=bench,"
           "request_format=/v1/completions", "--profile", f"kind=concurrent,streams={args.concurrency}",
           "--constraint", f"kind=max_requests,count={args.num_prompts}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
           "--tokenizer", f"kind=hf_auto,model={args.model_dir}", "--disable-progress",
           "--output", f"kind=json,path={out}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]

    def ok(name: str, stat: str) -> float:
        return m[name]["successful"][stat]

    if m["request_totals"]["errored"] or m["request_totals"]["incomplete"]:
        raise SystemExit(f"guidellm: requests failed: {m['request_totals']}")
    return {"ttft_median_ms": ok("time_to_first_token_ms", "median"), "ttft_mean_ms": ok("time_to_first_token_ms", "mean"),
            "itl_median_ms": ok("inter_token_latency_ms", "median"), "itl_mean_ms": ok("inter_token_latency_ms", "mean"),
            "output_tok_s": m["output_token_count"]["successful"]["total_sum"] / bench["duration"],
            "requests_s": m["request_totals"]["successful"] / bench["duration"]}


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the best round: lowest latency, highest throughput (noisy machines)."""
    return {k: (max if k.endswith("_s") else min)(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a model directory with its tokenizer")
    parser.add_argument("--guidellm", required=True, help="the guidellm command of its own venv")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp())
    lmfleet = Path(sys.executable).with_name("lmfleet")
    with open(tmp / "serve.log", "w") as log:
        server = subprocess.Popen([str(lmfleet), "serve", args.model_dir, "--served-model-name", "bench", "--port",
                                   str(port), "--max-num-seqs", str(args.concurrency), "--log-level", "warning"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url)
        ours(url, argparse.Namespace(**{**vars(args), "num_prompts": args.concurrency}))  # warm-up
        mine, guide = [], []
        for i in range(args.rounds):  # alternating: drift on a noisy machine hits both sides
            mine.append(ours(url, args))
            guide.append(theirs(url, args, tmp / f"guidellm-{i}.json"))
    finally:
        server.terminate()
        server.wait(timeout=60)
    a, b = best(mine), best(guide)
    print(f"{'metric':<16} {'lmfleet bench':>14} {'guidellm':>10} {'ratio':>7}")
    for k in a:
        print(f"{k:<16} {a[k]:>14.2f} {b[k]:>10.2f} {a[k] / b[k]:>7.3f}")


if __name__ == "__main__":
    main()
