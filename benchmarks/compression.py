"""Compressed variants of one model: quality, size and decode speed, against fp32 and llama.cpp.

Speed (a random model of --flavor, default `small`): fp32, bf16, int8 and int4 (blocks and head
quantized) in lmfleet's engine at batch 1 and 16, and llama.cpp's llama-bench on the GGUF export of
the same weights at the same bits (Q8_0 against int8, Q4_0 against int4) at batch 1. The sides
take turns --rounds times; each keeps its best. Effective bandwidth: the bytes of the weights one
decode step reads (every matrix but the embedding) times tokens/s.

Quality (--quality-model, a trained model, with --data its corpus): perplexity on the validation
split of fp32, bf16, int8, int4 (round to nearest, GPTQ, AWQ), 50% magnitude, 50% Wanda and 2:4
pruning; with --student-config, a student trained from scratch and one distilled from the model
for the same steps.

    python benchmarks/compression.py --llama-bin DIR --quality-model runs/tiny/final --data runs/corpus \\
        --write-docs docs/compression.md

writes the tables between the `compression-results` markers of docs/compression.md and a chart
next to it (compression.png).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import random_model
from llamacpp import decode_tok_s

from lmfleet.engine import LLMEngine
from lmfleet.engine.bench import decode_speed
from lmfleet.model.gguf_export import export_gguf

LMFLEET = str(Path(sys.executable).with_name("lmfleet"))


def cli(*args: str) -> str:
    result = subprocess.run([LMFLEET, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"lmfleet {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


def size_mib(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**20


def read_bytes(directory: Path) -> int:
    """Bytes one decode step reads: every stored tensor except the embedding lookup."""
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118
                if "embed_tokens" not in key:
                    t = f.get_slice(key)
                    total += torch.Size(t.get_shape()).numel() * {"F32": 4, "BF16": 2, "F16": 2, "I8": 1,
                                                                   "U8": 1}[t.get_dtype()]
    return total


def speed(args, tmp: Path) -> list[dict]:
    fp32 = random_model(tmp / "fp32", args.flavor, args.model_set, args.vocab)
    cli("quantize", str(fp32), "--out", str(tmp / "int8"), "--method", "int8", "--include-head")
    cli("quantize", str(fp32), "--out", str(tmp / "int4"), "--method", "int4", "--group-size", str(args.group_size),
        "--include-head")
    ggufs = {"Q8_0": export_gguf(fp32, tmp / "q8_0.gguf", "Q8_0"), "Q4_0": export_gguf(fp32, tmp / "q4_0.gguf", "Q4_0")}
    ours = {"fp32": (fp32, "fp32"), "bf16": (fp32, "bf16"), "int8": (tmp / "int8", "fp32"),
            "int4": (tmp / "int4", "fp32")}
    best: dict[str, float] = {}
    threads = torch.get_num_threads()
    for round_ in range(args.rounds):
        for name, (directory, dtype) in ours.items():
            for batch in (1, 16):
                engine = LLMEngine(directory, dtype=dtype, max_num_seqs=batch, kv_cache_memory=64 * 2**20,
                                   enable_prefix_caching=False)
                rate = decode_speed(engine, batch, tokens=args.tokens, rounds=1)
                best[f"{name}@{batch}"] = max(best.get(f"{name}@{batch}", 0.0), rate)
                del engine
        if args.llama_bin:
            for name, path in ggufs.items():
                rate = decode_tok_s(args.llama_bin, path, threads, args.tokens)
                best[f"{name}@1"] = max(best.get(f"{name}@1", 0.0), rate)
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()), file=sys.stderr)
    rows = []
    for name, (directory, _dtype) in ours.items():
        weights = read_bytes(directory) // (2 if name == "bf16" else 1)
        peer = {"int8": "Q8_0", "int4": "Q4_0"}.get(name)
        rows.append({"variant": name, "size_mib": size_mib(directory) / (2 if name == "bf16" else 1),
                     "tok_s_b1": best[f"{name}@1"], "tok_s_b16": best[f"{name}@16"],
                     "vs_fp32_b1": best[f"{name}@1"] / best["fp32@1"],
                     "vs_fp32_b16": best[f"{name}@16"] / best["fp32@16"],
                     "gb_s_b1": weights * best[f"{name}@1"] / 1e9,
                     "llamacpp": peer, "llamacpp_tok_s_b1": best.get(f"{peer}@1") if peer else None,
                     "vs_llamacpp_b1": best[f"{name}@1"] / best[f"{peer}@1"] if peer and f"{peer}@1" in best else None})
    for name, path in ggufs.items():
        if f"{name}@1" in best:
            rows.append({"variant": f"llama.cpp {name}", "size_mib": path.stat().st_size / 2**20,
                         "tok_s_b1": best[f"{name}@1"], "vs_fp32_b1": best[f"{name}@1"] / best["fp32@1"]})
    return rows


def quality(args, tmp: Path) -> list[dict]:
    model, data = args.quality_model, str(args.data)
    calib = ("--data", data, "--samples", str(args.samples), "--seq-len", str(args.seq_len))
    g = str(args.group_size)
    variants = {
        "fp32": None,
        "bf16": None,
        "int8": ("quantize", "--method", "int8"),
        f"int4 g{g}": ("quantize", "--method", "int4", "--group-size", g),
        f"int4 g{g} GPTQ": ("quantize", "--method", "int4", "--group-size", g, "--calibrate", "gptq", *calib),
        f"int4 g{g} AWQ": ("quantize", "--method", "int4", "--group-size", g, "--calibrate", "awq", *calib),
        "50% magnitude": ("prune", "--method", "magnitude", "--sparsity", "0.5"),
        "50% Wanda": ("prune", "--method", "wanda", "--sparsity", "0.5", *calib),
        "2:4 magnitude": ("prune", "--method", "magnitude", "--pattern", "2:4"),
        "2:4 Wanda": ("prune", "--method", "wanda", "--pattern", "2:4", *calib),
    }
    if args.student_config:
        steps = ("--steps", str(args.student_steps))
        cli("train", str(args.student_config), "--data", data, "--out", str(tmp / "scratch"), *steps)
        cli("distill", model, str(args.student_config), "--data", data, "--out", str(tmp / "distilled"), *steps)
        variants[f"student from scratch ({args.student_steps} steps)"] = ("-", str(tmp / "scratch" / "final"))
        variants[f"student distilled ({args.student_steps} steps)"] = ("-", str(tmp / "distilled" / "final"))
    rows = []
    for i, (name, command) in enumerate(variants.items()):
        directory, dtype = Path(model), "fp32"
        if name == "bf16":
            dtype = "bf16"
        elif command is not None and command[0] == "-":
            directory = Path(command[1])
        elif command is not None:
            directory = tmp / f"q{i}"
            cli(command[0], model, "--out", str(directory), *command[1:])
        report = json.loads(cli("eval", str(directory), "--data", data, "--max-tokens", str(args.eval_tokens),
                                "--dtype", dtype, "--no-speed", "--json"))
        size = report["size_bytes"] / 2**20 / (2 if name == "bf16" else 1)  # as a bf16 copy would store it
        rows.append({"variant": name, "perplexity": report["perplexity"], "size_mib": size})
        print(f"{name}: perplexity {report['perplexity']:.3f}", file=sys.stderr)
    for row in rows:
        row["ppl_change_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1)
    return rows


def tables(speed_rows: list[dict], quality_rows: list[dict], args) -> str:
    lines = []
    if speed_rows:
        shape = f" with {', '.join(args.model_set)}" if args.model_set else ""
        lines += [f"Speed: random `{args.flavor}` model{shape} (vocabulary {args.vocab}), decode of {args.tokens} "
                  "tokens after a 16-token prompt, "
                  f"best of {args.rounds} alternating rounds, {torch.get_num_threads()} threads.", "",
                  "| variant | size MiB | batch 1 tok/s | vs fp32 | GB/s read | vs llama.cpp (same bits) | "
                  "batch 16 tok/s | vs fp32 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in speed_rows:
            peer = f"{r['vs_llamacpp_b1']:.2f}× ({r['llamacpp']} {r['llamacpp_tok_s_b1']:.1f})" \
                if r.get("vs_llamacpp_b1") else "—"
            b16 = f"{r['tok_s_b16']:.1f} | {r['vs_fp32_b16']:.2f}×" if "tok_s_b16" in r else "— | —"
            gbs = f"{r['gb_s_b1']:.1f}" if "gb_s_b1" in r else "—"
            lines.append(f"| {r['variant']} | {r['size_mib']:.1f} | {r['tok_s_b1']:.1f} | {r['vs_fp32_b1']:.2f}× | "
                         f"{gbs} | {peer} | {b16} |")
        lines.append("")
    if quality_rows:
        lines += [f"Quality: `{args.quality_model}` on `{args.data}` (validation split, {args.eval_tokens:,} tokens); "
                  f"calibration {args.samples} windows of {args.seq_len} tokens from the train split.", "",
                  "| variant | perplexity | change vs fp32 | size MiB |", "| --- | --- | --- | --- |"]
        for r in quality_rows:
            lines.append(f"| {r['variant']} | {r['perplexity']:.3f} | {r['ppl_change_pct']:+.2f}% | {r['size_mib']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def chart(speed_rows: list[dict], quality_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if speed_rows:
        axes[0].barh([r["variant"] for r in speed_rows], [r["tok_s_b1"] for r in speed_rows], color="tab:blue")
        axes[0].set_xlabel("batch-1 decode tokens/s (higher is better)")
    if quality_rows:
        axes[1].barh([r["variant"] for r in quality_rows], [r["ppl_change_pct"] for r in quality_rows],
                     color="tab:orange")
        axes[1].set_xlabel("perplexity change vs fp32, % (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--model-set", action="append", default=[], help="ModelConfig override key=value")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--llama-bin", help="folder with llama.cpp's llama-bench (see shared/BENCHMARK-PEERS.md)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--quality-model")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=100_000)
    parser.add_argument("--student-config", type=Path, help="a student's training config: adds the student "
                        "trained from scratch and distilled from --quality-model, for --student-steps each")
    parser.add_argument("--student-steps", type=int, default=300)
    parser.add_argument("--write-docs", type=Path)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        speed_rows = [] if args.no_speed else speed(args, Path(tmp))
        quality_rows = quality(args, Path(tmp)) if args.quality_model else []
    text = tables(speed_rows, quality_rows, args)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"speed": speed_rows, "quality": quality_rows}, indent=2))
    if args.write_docs:
        doc = args.write_docs.read_text()
        block = f"<!-- compression-results -->\n{text}\n<!-- /compression-results -->"
        doc, n = re.subn(r"<!-- compression-results -->.*?<!-- /compression-results -->", lambda _m: block, doc,
                         flags=re.S)
        if n != 1:
            raise SystemExit(f"{args.write_docs} has no compression-results markers")
        args.write_docs.write_text(doc)
        chart(speed_rows, quality_rows, args.write_docs.with_name("compression.png"))


if __name__ == "__main__":
    main()
