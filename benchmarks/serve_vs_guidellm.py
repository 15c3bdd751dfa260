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
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import free_port, stop, wait_healthy

from lmfleet.serve.bench import BenchConfig, run_benchmark


def ours(url: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = BenchConfig(url, num_prompts=args.num_prompts, model="bench",
                      concurrency=None if args.rate else args.concurrency, request_rate=args.rate,
                      input_len=(args.prompt_tokens, args.prompt_tokens),
                      output_len=(args.output_tokens, args.output_tokens), token_range=(100, 4000))
    s = asyncio.run(run_benchmark(cfg))
    if s["failed"]:
        raise SystemExit(f"lmfleet bench serve: {s['failed']} requests failed: {s.get('first_errors')}")
    # guidellm's "inter-token latency" is per request (latency - TTFT) / (output tokens - 1): ours is tpot
    return {"ttft_median_ms": s["ttft_s"]["median"] * 1e3, "ttft_mean_ms": s["ttft_s"]["mean"] * 1e3,
            "itl_median_ms": s["tpot_s"]["median"] * 1e3, "itl_mean_ms": s["tpot_s"]["mean"] * 1e3,
            "latency_median_ms": s["e2e_latency_s"]["median"] * 1e3,
            "output_tok_s": s["output_token_throughput"], "requests_s": s["request_throughput"],
            "prompt_tokens": s["prompt_tokens"] / s["completed"], "output_tokens": s["output_tokens"] / s["completed"]}


def theirs(url: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cmd = [args.guidellm, "run", "--backend", f"kind=openai_http,target={url},model=bench,"
           "request_format=/v1/completions", "--profile",
           f"kind=poisson,rate={args.rate}" if args.rate else f"kind=concurrent,streams={args.concurrency}",
           "--constraint", f"kind=max_requests,count={args.num_prompts}",
           "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
           "--tokenizer", f"kind=hf_auto,model={args.model_dir}", "--disable-progress",
           "--output", f"kind=json,path={out}"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    bench = json.loads(out.read_text())["benchmarks"][0]
    m = bench["metrics"]

    def ok(name: str, stat: str) -> float:
        return m[name]["successful"][stat]

    cached = sum(r.get("cached_tokens") or 0 for r in bench["requests"]["successful"])
    if cached:
        raise SystemExit(f"guidellm: {cached} prompt tokens came from the prefix cache (it should be off)")
    if m["request_totals"]["errored"] or m["request_totals"]["incomplete"]:
        raise SystemExit(f"guidellm: requests failed: {m['request_totals']}")
    return {"ttft_median_ms": ok("time_to_first_token_ms", "median"), "ttft_mean_ms": ok("time_to_first_token_ms", "mean"),
            "itl_median_ms": ok("inter_token_latency_ms", "median"), "itl_mean_ms": ok("inter_token_latency_ms", "mean"),
            "latency_median_ms": ok("request_latency", "median") * 1e3,
            "output_tok_s": m["output_token_count"]["successful"]["total_sum"] / bench["duration"],
            "requests_s": m["request_totals"]["successful"] / bench["duration"],
            "prompt_tokens": ok("prompt_token_count", "mean"), "output_tokens": ok("output_token_count", "mean")}


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per metric, the best round: lowest latency, highest throughput (noisy machines)."""
    return {k: (max if k.endswith(("_s", "_tokens")) else min)(r[k] for r in runs) for k in runs[0]}


def cpus(text: str | None) -> set[int] | None:
    return None if text is None else {int(c) for c in text.split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="a model directory with its tokenizer")
    parser.add_argument("--guidellm", required=True, help="the guidellm command of its own venv")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rate", type=float, help="Poisson arrivals at this many requests/s instead of a "
                        "fixed concurrency (both clients then offer the same load pattern)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--server-cpus", help="CPUs for the server, e.g. 0 (its torch threads: as many)")
    parser.add_argument("--client-cpus", help="CPUs for both clients, e.g. 1 (guidellm inherits them)")
    args = parser.parse_args()
    server_cpus, client_cpus = cpus(args.server_cpus), cpus(args.client_cpus)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp())
    lmfleet = Path(sys.executable).with_name("lmfleet")
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(len(server_cpus))} if server_cpus else {}))
    with open(tmp / "serve.log", "w") as log:
        server = subprocess.Popen([str(lmfleet), "serve", args.model_dir, "--served-model-name", "bench", "--port",
                                   str(port), "--max-num-seqs", str(args.concurrency), "--log-level", "warning",
                                   # both clients send the same prompts every round: a prefix cache would
                                   # make every round after a tool's first one faster for it alone
                                   "--no-prefix-caching"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env,
                                  preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if server_cpus else None)
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    try:
        wait_healthy(url)
        ours(url, argparse.Namespace(**{**vars(args), "num_prompts": args.concurrency, "rate": None}))  # warm-up
        mine, guide = [], []
        for i in range(args.rounds):  # alternating: drift on a noisy machine hits both sides
            mine.append(ours(url, args))
            guide.append(theirs(url, args, tmp / f"guidellm-{i}.json"))
    finally:
        stop(server)
    a, b = best(mine), best(guide)
    load = f"Poisson arrivals at {args.rate:g}/s" if args.rate else f"concurrency {args.concurrency}"
    print(f"server CPUs {args.server_cpus or 'all'}, client CPUs {args.client_cpus or 'all'}; {args.num_prompts} "
          f"requests, {load}; best of {args.rounds} alternating rounds; prefix caching off")
    print(f"{'metric':<16} {'lmfleet bench':>14} {'guidellm':>10} {'ratio':>7}")
    for k in a:
        print(f"{k:<16} {a[k]:>14.2f} {b[k]:>10.2f} {a[k] / b[k]:>7.3f}")


if __name__ == "__main__":
    main()
