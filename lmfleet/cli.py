"""The `lmfleet` command. Each sub-command is a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmfleet import __version__
from lmfleet.errors import ConfigError, LmfleetError

app = typer.Typer(help="lmfleet: train, compress and serve language models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Build token corpora from text.", no_args_is_help=True)
app.add_typer(data_app, name="data")
export_app = typer.Typer(help="Export a model to other formats.", no_args_is_help=True)
app.add_typer(export_app, name="export")
bench_app = typer.Typer(help="Benchmarks of the engine.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
recsys_app = typer.Typer(help="A sequential recommender (SASRec): prepare, train, eval, serve.", no_args_is_help=True)
app.add_typer(recsys_app, name="recsys")

console = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        print(f"lmfleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    pass


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs; values parse as JSON when they can (numbers, true/false, null)."""
    result: dict[str, object] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r} should look like key=value")
        key, raw = pair.split("=", 1)
        try:
            result[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            result[key.strip()] = raw
    return result


# ---- data ----------------------------------------------------------------------------------------

@data_app.command("prepare")
def data_prepare(
    source: Annotated[list[str], typer.Option("--source", "-s", help="'stdlib' (the running Python's standard "
                                              "library .py files) or a text file / directory; repeatable.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Corpus directory to write.")],
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size, special tokens included.")] = 8192,
    val_fraction: Annotated[float, typer.Option(help="Fraction of documents held out for validation.")] = 0.01,
    tokenizer: Annotated[Path | None, typer.Option(help="Reuse the tokenizer of this model or corpus "
                                                      "directory instead of training one.")] = None,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 50_000_000,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a corpus already in --out (a "
                                            "directory holding anything else is always refused).")] = False,
) -> None:
    """Train a tokenizer on text sources and write token shards, a train/val split and manifest.json."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmfleet.data.corpus import prepare_corpus

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("training tokenizer" if tokenizer is None else "loading tokenizer", total=None)

        def progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description="tokenizing", completed=done, total=total)

        manifest = prepare_corpus(source, out_dir, vocab_size=vocab_size, val_fraction=val_fraction,
                                  shard_tokens=shard_tokens, tokenizer=tokenizer, progress=progress,
                                  overwrite=overwrite)
    table = Table(title=f"corpus {out_dir}", show_header=True)
    for col in ("split", "documents", "tokens", "shards"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for name, split in manifest["splits"].items():
        table.add_row(name, str(split["documents"]), f"{split['tokens']:,}", str(len(split["shards"])))
    out.print(table)
    n_bytes = sum(s["bytes"] for s in manifest["sources"])
    out.print(f"sources: {', '.join(s['source'] for s in manifest['sources'])} — {manifest['files_read']} files, "
              f"{_human_bytes(n_bytes)} ({manifest['files_skipped']} skipped as non-text); "
              f"vocab {manifest['vocab_size']} ({manifest['dtype']}); {manifest['seconds']:.1f} s")


# ---- model ---------------------------------------------------------------------------------------

@app.command("init")
def init(
    out_dir: Annotated[Path, typer.Argument(help="Model directory to write.")],
    tokenizer: Annotated[Path, typer.Option(help="Corpus or model directory whose tokenizer the model uses.")],
    flavor: Annotated[str, typer.Option(help="Named size: debug (~1M), tiny (~10M), small (~60M).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Initialisation seed.")] = 0,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a ModelConfig field, "
                                                           "e.g. --set num_hidden_layers=2.")] = None,
) -> None:
    """Write a freshly initialised model directory (HF layout) for a tokenizer."""
    from lmfleet.model import ModelConfig, build_model, load_tokenizer, save_model

    tok = load_tokenizer(tokenizer)
    fields = _parse_overrides(overrides or [])
    fields.setdefault("vocab_size", tok.vocab_size)
    config = ModelConfig.from_flavor(flavor, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id, **fields)
    if config.vocab_size < tok.vocab_size:
        raise ConfigError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    save_model(build_model(config, seed=seed), out_dir, tokenizer=tok)
    out.print(f"wrote {flavor} model ({config.num_params() / 1e6:.1f}M parameters) to {out_dir}")


@app.command("info")
def info(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    tp: Annotated[int | None, typer.Option("--tp", help="Also show each rank's parameter and KV-cache memory "
                                           "when served with --tensor-parallel-size N.")] = None,
    kv_tokens: Annotated[int | None, typer.Option(help="With --tp: tokens of KV cache to size (default: "
                                                  "max_position_embeddings).")] = None,
    dtype: Annotated[str, typer.Option(help="With --tp: the serving dtype, fp32, bf16, fp16 or auto.")] = "fp32",
) -> None:
    """Show a model directory's config, parameter count, dtype and size on disk; with --tp N,
    the memory each tensor-parallel rank holds."""
    from lmfleet.model import model_info

    details = model_info(model_dir)
    if tp is not None:
        from lmfleet.model.checkpoint import parse_dtype, read_config
        from lmfleet.parallel.tensor_parallel import tp_memory

        config = read_config(model_dir)
        tokens = config.max_position_embeddings if kv_tokens is None else kv_tokens
        if tokens < 1:
            raise ConfigError(f"--kv-tokens={tokens} must be >= 1")
        raw = json.loads((Path(details["path"]) / "config.json").read_text())
        element = parse_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype")).itemsize
        details["tensor_parallel"] = {"tp": tp, "kv_tokens": tokens, "dtype_bytes": element,
                                      "ranks": tp_memory(config, tp, element, tokens)}
    if as_json:
        print(json.dumps(details, indent=2))
        return
    table = Table(title=str(model_dir), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("architecture", details["architecture"])
    table.add_row("parameters", f"{details['parameters']:,} ({details['parameters'] / 1e6:.1f}M)")
    table.add_row("dtype", details["dtype"])
    table.add_row("size on disk", f"{_human_bytes(details['size_bytes'])} in {details['weight_files']} weight file(s)")
    table.add_row("tokenizer", "yes" if details["has_tokenizer"] else "no")
    table.add_row("quantization", details["quantization"] or "none")
    for key, value in details["config"].items():
        table.add_row(key, str(value))
    out.print(table)
    if tp is not None:
        split = details["tensor_parallel"]
        ranks = Table(title=f"tensor parallel {tp}: per rank ({split['dtype_bytes']}-byte elements, KV cache for "
                            f"{split['kv_tokens']:,} tokens)")
        for column in ("rank", "parameters", "weights", "KV cache / token", "KV cache"):
            ranks.add_column(column, justify="right")
        for r in split["ranks"]:
            ranks.add_row(str(r["rank"]), f"{r['params']:,}", _human_bytes(r["weight_bytes"]),
                          _human_bytes(r["kv_bytes_per_token"]), _human_bytes(r["kv_bytes"]))
        out.print(ranks)


@app.command("generate")
def generate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    prompt: Annotated[str, typer.Argument(help="Prompt text (a user message with --chat).")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed, for reproducible output.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    dtype: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto.")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Generate text from a prompt, through the serving engine (the same sampler and seeds as
    `lmfleet serve`: the same seed gives the same text)."""
    from lmfleet.engine import LLMEngine, SamplingParams
    from lmfleet.model import load_tokenizer
    from lmfleet.model.checkpoint import read_config

    config = read_config(model_dir)
    tok = load_tokenizer(model_dir)
    if chat:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    else:
        ids = tok.encode(prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k or 0,
                            top_p=1.0 if top_p is None else top_p, seed=seed)
    block_size = 16  # a cache just large enough for this one request
    num_blocks = -(-min(len(ids) + max_tokens, config.max_position_embeddings) // block_size)
    # One request: no decode graphs to capture (enforce_eager), a cache just for it.
    engine = LLMEngine(model_dir, tok, dtype=dtype, device=device, max_num_seqs=1, block_size=block_size,
                       num_blocks=max(1, num_blocks), enforce_eager=True)
    engine.add_request(ids, params)
    if not chat:
        sys.stdout.write(prompt)
    while engine.has_unfinished_requests():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
            if out.error is not None:
                sys.stdout.write("\n")
                raise LmfleetError(f"generation failed: {out.error}")
    sys.stdout.write("\n")


# ---- training ------------------------------------------------------------------------------------

@app.command("train")
def train(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="Training config (see configs/).")],
    data: Annotated[Path | None, typer.Option(help="Corpus directory (overrides [data] dir).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (overrides [train] out_dir).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides [train] steps).")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="Checkpoint interval in steps.")] = None,
    nproc: Annotated[int, typer.Option(help="Worker processes on this node (1: in-process, no launcher).")] = 1,
    metrics_port: Annotated[int | None, typer.Option(help="Rank 0 serves Prometheus /metrics (lmfleet_train:*) on this "
                                                     "port during the run (overrides [train] metrics_port; host: "
                                                     "train.metrics_host, 127.0.0.1).")] = None,
    nnodes: Annotated[str, typer.Option(help="Nodes taking part, N or MIN:MAX (elastic: nodes may leave down to "
                                        "MIN and join up to MAX; the group restarts at the new size from the "
                                        "last checkpoint). More than one needs --rdzv-endpoint.")] = "1",
    node_rank: Annotated[int | None, typer.Option(help="This node's rank (multi-node).")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of the rendezvous (multi-node).")] = None,
    rdzv_conf: Annotated[str | None, typer.Option(help="torchrun's rendezvous settings, e.g. "
                                                  "last_call_timeout=10,join_timeout=300.")] = None,
    tp: Annotated[int | None, typer.Option("--tp", help="Tensor-parallel degree (overrides [parallel] tp).")] = None,
    pp: Annotated[int | None, typer.Option("--pp", help="Pipeline-parallel degree (overrides [parallel] pp).")] = None,
    pp_schedule: Annotated[str | None, typer.Option(help="1f1b or gpipe (overrides [parallel] pp_schedule).")] = None,
    max_restarts: Annotated[int, typer.Option(help="Restart the worker group up to K times after a failure; "
                                              "workers resume from the latest checkpoint.")] = 0,
    strategy: Annotated[str | None, typer.Option(help="ddp, fsdp or diloco (overrides [train] strategy).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's latest complete checkpoint.")] = False,
    allow_new_data: Annotated[bool, typer.Option("--allow-new-data", help="With --resume: continue on a corpus "
                                                 "other than the one the checkpoint was trained on.")] = False,
    checkpoint_on_sigterm: Annotated[bool, typer.Option(help="On SIGTERM, finish the current step, checkpoint it "
                                                        "and exit 0.")] = True,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override any setting: "
                                                           "section.key=value, e.g. optim.lr=1e-3.")] = None,
) -> None:
    """Train a model on a corpus: DDP, FSDP2 or DiLoCo across processes and nodes, tensor and
    pipeline parallel (--tp, --pp) with data parallel over the rest."""
    from lmfleet.train import LaunchSpec
    from lmfleet.train.launch import parse_nnodes

    config = _train_config(config_path, overrides, {
        "data.dir": data, "train.out_dir": out_dir, "train.steps": steps, "checkpoint.every": checkpoint_every,
        "train.strategy": strategy, "parallel.tp": tp, "parallel.pp": pp, "parallel.pp_schedule": pp_schedule,
        "train.metrics_port": metrics_port})
    min_nodes, max_nodes = parse_nnodes(nnodes)
    spec = LaunchSpec(nproc=nproc, nnodes=min_nodes, max_nnodes=max_nodes, node_rank=node_rank,
                      rdzv_endpoint=rdzv_endpoint, rdzv_conf=rdzv_conf, max_restarts=max_restarts, resume=resume,
                      allow_new_data=allow_new_data, checkpoint_on_sigterm=checkpoint_on_sigterm)
    _launch(config, spec)


def _train_config(config_path: Path, overrides: list[str] | None, options: dict[str, object]):
    """A training config from its TOML file, then `--set` pairs, then the named options given."""
    from lmfleet.train import TrainConfig

    fields = _parse_overrides(overrides or [])
    for key, value in options.items():
        if value is not None:
            fields[key] = str(value) if isinstance(value, Path) else value
    return TrainConfig.load(config_path).apply_overrides(fields)


def _launch(config, spec, task=None) -> None:
    """Run a training job and print how it ended."""
    from lmfleet.train import launch

    summary = launch(config, spec, task)
    if summary.get("stopped_at") is not None:
        out.print(f"stopped by SIGTERM after step {summary['stopped_at']}: checkpoint {summary['checkpoint']} "
                  "(continue with --resume)")
    elif summary.get("final_dir") and "val_ndcg@10" in summary:
        out.print(f"final model: {summary['final_dir']} (validation HR@10 {summary['val_hr@10']:.4f}, "
                  f"NDCG@10 {summary['val_ndcg@10']:.4f})")
    elif summary.get("final_dir"):
        out.print(f"final model: {summary['final_dir']} (validation perplexity "
                  f"{summary.get('val_perplexity', float('nan')):.2f})")
    else:
        out.print(f"run directory: {summary.get('run_dir')}")


@app.command("distill")
def distill_cmd(
    teacher_dir: Annotated[Path, typer.Argument(metavar="TEACHER_DIR", help="The teacher model directory.")],
    config_path: Annotated[Path, typer.Argument(metavar="STUDENT_CONFIG.toml", help="The student's training config.")],
    data: Annotated[Path | None, typer.Option(help="Corpus directory, tokenized with the teacher's tokenizer "
                                              "(overrides [data] dir).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (overrides [train] out_dir).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides [train] steps).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature of the KL term "
                                                      "(overrides [distill] temperature).")] = None,
    alpha: Annotated[float | None, typer.Option(help="Weight of the KL term; 1 - alpha weighs the cross-entropy "
                                                "(overrides [distill] alpha).")] = None,
    nproc: Annotated[int, typer.Option(help="Worker processes on this node (1: in-process, no launcher).")] = 1,
    strategy: Annotated[str | None, typer.Option(help="ddp, fsdp (the teacher is sharded too) or diloco.")] = None,
    max_restarts: Annotated[int, typer.Option(help="Restart the worker group up to K times after a failure.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's latest complete checkpoint.")] = False,
    checkpoint_on_sigterm: Annotated[bool, typer.Option(help="On SIGTERM, finish the current step, checkpoint it "
                                                        "and exit 0.")] = True,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override any setting: section.key=value.")] = None,
) -> None:
    """Train a student model on a teacher's soft targets (KL at a temperature, plus cross-entropy)
    with the distributed trainer: strategies, checkpoints, resume and SIGTERM apply as in `train`."""
    from lmfleet.train import LaunchSpec

    config = _train_config(config_path, overrides, {
        "distill.teacher": teacher_dir, "data.dir": data, "train.out_dir": out_dir, "train.steps": steps,
        "train.strategy": strategy, "distill.temperature": temperature, "distill.alpha": alpha})
    _launch(config, LaunchSpec(nproc=nproc, max_restarts=max_restarts, resume=resume,
                               checkpoint_on_sigterm=checkpoint_on_sigterm))


def _calibration(model, data: Path | None, samples: int, seq_len: int, what: str):
    """Calibration windows from --data (`seq_len` capped at the model's context, with a note)."""
    from lmfleet.compress.calibrate import calibration_ids

    if data is None:
        raise ConfigError(f"{what} needs calibration data: give --data (a corpus from `lmfleet data prepare`)")
    context = model.config.max_position_embeddings
    if seq_len > context:
        console.print(f"--seq-len {seq_len} is beyond the model's context: calibrating on windows of {context}")
    return calibration_ids(data, samples, min(seq_len, context), model.config.vocab_size)


def _load_source(model_dir: Path):
    """The model to compress (computed on in fp32), its tokenizer (read first: a bad one fails
    before any work) and the dtype its floating-point tensors are written back in."""
    from lmfleet.model import load_model, load_tokenizer
    from lmfleet.model.checkpoint import _read_json, parse_dtype

    tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    model = load_model(model_dir)
    raw = _read_json(model_dir / "config.json")
    return model, tokenizer, parse_dtype("auto", raw.get("dtype") or raw.get("torch_dtype"))


def _layer_progress(what: str):
    import time

    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        console.print(f"{what}: {done}/{total} done, {elapsed:.0f} s, about {elapsed / done * (total - done):.0f} s left")
    return progress


def _write_compressed(model, tokenizer, dtype, out_dir: Path, extra_config: dict, label: str) -> None:
    """Save the compressed model; its weights (not the quantization scales) in the source's dtype."""
    from lmfleet.model import save_model

    for param in model.parameters():
        param.data = param.data.to(dtype)
    save_model(model, out_dir, tokenizer=tokenizer, extra_config=extra_config)
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    out.print(f"{label}: {out_dir} ({_human_bytes(size)})")


def _check_out(out_dir: Path) -> None:
    if out_dir.exists():
        raise ConfigError(f"--out {out_dir} already exists; give a new directory (nothing was written)")


@app.command("quantize")
def quantize_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout, floating point).")],
    out_dir: Annotated[Path, typer.Option("--out", help="New model directory to write (must not exist).")],
    method: Annotated[str, typer.Option(help="int8: one scale per output channel; int4: a scale and zero "
                                        "point per group of input columns.")] = "int8",
    group_size: Annotated[int, typer.Option(help="int4: input columns per group (32, 64, 128 or 256; must "
                                            "divide every layer's input size).")] = 64,
    calibrate: Annotated[str, typer.Option(help="int4: none (round to nearest), gptq or awq.")] = "none",
    data: Annotated[Path | None, typer.Option(help="Calibration corpus (from `lmfleet data prepare`), for "
                                              "--calibrate gptq|awq.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows drawn from the corpus's train split.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    include_head: Annotated[bool, typer.Option(help="Quantize the LM head too (a tied head is untied: the "
                                               "embedding stays floating point).")] = False,
) -> None:
    """Quantize a model's linear layers into a new model directory that `lmfleet serve` runs."""
    from lmfleet.compress.calibrate import quantize_calibrated
    from lmfleet.compress.quantize import CALIBRATIONS, check_quantize, quantization_config, quantize_model

    _check_out(out_dir)
    if calibrate not in CALIBRATIONS:
        raise ConfigError(f"--calibrate {calibrate!r} is not one of {list(CALIBRATIONS)}")
    if calibrate != "none" and method != "int4":
        raise ConfigError(f"--calibrate {calibrate} applies to --method int4 (int8 rounds to nearest)")
    model, tokenizer, dtype = _load_source(model_dir)
    check_quantize(model, method, group_size if method == "int4" else None, include_head)
    if calibrate == "none":
        quantize_model(model, method, include_head=include_head, group_size=group_size if method == "int4" else None)
    else:
        ids = _calibration(model, data, samples, seq_len, f"--calibrate {calibrate}")
        quantize_calibrated(model, ids, calibrate, group_size, include_head=include_head,
                            progress=_layer_progress(calibrate))
    config = quantization_config(model, method, group_size if method == "int4" else None, calibrate)
    label = method if method == "int8" else f"int4 g{group_size}" + ("" if calibrate == "none" else f" {calibrate}")
    _write_compressed(model, tokenizer, dtype, out_dir, {"quantization_config": config}, label)


@app.command("prune")
def prune_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout, floating point).")],
    out_dir: Annotated[Path, typer.Option("--out", help="New model directory to write (must not exist).")],
    sparsity: Annotated[float | None, typer.Option(help="Fraction of each block linear's weights set to zero, "
                                                   "in [0, 1) (implied by --pattern).")] = None,
    method: Annotated[str, typer.Option(help="magnitude (|W|, per layer) or wanda (|W|·||X||, per output "
                                        "row; needs --data).")] = "magnitude",
    pattern: Annotated[str | None, typer.Option(help="N:M: keep N of every M consecutive input weights "
                                                "(e.g. 2:4).")] = None,
    data: Annotated[Path | None, typer.Option(help="Calibration corpus, for --method wanda.")] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows drawn from the corpus's train split.")] = 128,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
) -> None:
    """Set a fraction of a model's block weights to zero; writes a new floating-point model directory."""
    from lmfleet.compress.prune import check_prune, parse_pattern, prune_model

    _check_out(out_dir)
    model, tokenizer, dtype = _load_source(model_dir)
    check_prune(model, method, sparsity, parse_pattern(pattern))
    ids = None
    if method == "wanda":
        ids = _calibration(model, data, samples, seq_len, "--method wanda")
    config = prune_model(model, method, sparsity, pattern, ids, progress=_layer_progress(method))
    _write_compressed(model, tokenizer, dtype, out_dir, {"pruning_config": config},
                      f"{method} {config['pattern'] or ''} sparsity {config['achieved']:.4f}".replace("  ", " "))


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    data: Annotated[Path, typer.Option(help="Corpus directory (from `lmfleet data prepare`).")],
    split: Annotated[str, typer.Option(help="Corpus split to score.")] = "val",
    seq_len: Annotated[int, typer.Option(help="Tokens per scored window.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Score at most this many tokens.")] = 1_000_000,
    dtype: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto.")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    speed: Annotated[bool, typer.Option(help="Also measure decode tokens/s at batch 1 and 16 in the engine.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Perplexity of a model on a corpus split, its size on disk and (--speed) its decode speed."""
    from lmfleet.compress.evaluate import evaluate_perplexity
    from lmfleet.data.corpus import Corpus
    from lmfleet.model import load_model
    from lmfleet.model.checkpoint import resolve_device

    if seq_len <= 0 or max_tokens <= 0:
        raise ConfigError(f"--seq-len={seq_len} and --max-tokens={max_tokens} must be positive")
    resolved = resolve_device(device)  # a bad --device is said before any work
    corpus = Corpus(data)
    model = load_model(model_dir, dtype=dtype, device=resolved)
    if corpus.vocab_size > model.config.vocab_size:
        raise ConfigError(f"corpus {data} has a vocabulary of {corpus.vocab_size}, larger than the model's "
                          f"{model.config.vocab_size}: it was tokenized for another model")
    seq_len = min(seq_len, model.config.max_position_embeddings)
    result = evaluate_perplexity(model, corpus, seq_len=seq_len, max_tokens=max_tokens, split=split)
    result.update({"model": str(model_dir), "data": str(data), "split": split, "seq_len": seq_len,
                   "size_bytes": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))})
    if speed:
        from lmfleet.engine import LLMEngine
        from lmfleet.engine.bench import decode_speed

        del model
        for batch in (1, 16):
            # KV blocks for 16 prompt + 32 decoded tokens a sequence, whatever the model's size.
            engine = LLMEngine(model_dir, max_num_seqs=batch, num_blocks=batch * 4 + 2, block_size=16, max_model_len=64,
                               enable_prefix_caching=False, dtype=dtype, device=device)
            result[f"decode_tok_s_batch{batch}"] = decode_speed(engine, batch)
            del engine
    if as_json:
        print(json.dumps(result))
    else:
        line = (f"{split} perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f} nats/token) over "
                f"{result['tokens']:,} tokens; {_human_bytes(result['size_bytes'])} on disk")
        if speed:
            line += (f"; decode {result['decode_tok_s_batch1']:.1f} tok/s at batch 1, "
                     f"{result['decode_tok_s_batch16']:.1f} at batch 16")
        out.print(line)


@app.command("plot")
def plot(
    run_dir: Annotated[Path, typer.Argument(help="Run directory holding metrics.jsonl.")],
    output: Annotated[Path | None, typer.Option("--out", help="Image path (default RUN_DIR/loss.png).")] = None,
) -> None:
    """Plot training and validation loss against tokens seen (loss.png)."""
    from lmfleet.train.plot import plot_run

    out.print(f"wrote {plot_run(run_dir, output)}")


# ---- recsys ---------------------------------------------------------------------------------------

@recsys_app.command("prepare")
def recsys_prepare(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write.")],
    interactions: Annotated[Path | None, typer.Option(help="Interaction log: MovieLens u.data / ratings.dat, a "
                                                      "RecBole .inter file, or CSV user,item,timestamp.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="auto (by file name), movielens, recbole or csv.")] = "auto",
    synthetic: Annotated[str | None, typer.Option(help="USERS,ITEMS: generate a log instead, with popularity skew "
                                                  "and a planted rule (item i is usually followed by i+1).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of --synthetic.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a dataset already in --out.")] = False,
) -> None:
    """Order interactions by time, map ids, build per-user sequences and a leave-one-out split."""
    from lmfleet.recsys.data import prepare_interactions

    sizes = None
    if synthetic is not None:
        try:
            users, items = (int(v) for v in synthetic.split(","))
        except ValueError:
            raise ConfigError(f"--synthetic {synthetic!r} should be USERS,ITEMS, e.g. 1000,500") from None
        sizes = (users, items)
    manifest = prepare_interactions(interactions, out_dir, fmt, synthetic=sizes, seed=seed, overwrite=overwrite)
    out.print(f"{out_dir}: {manifest['num_users']:,} users, {manifest['num_items']:,} items, "
              f"{manifest['interactions']:,} interactions ({manifest['users_with_test']:,} users with a test item)")


@recsys_app.command("train")
def recsys_train(
    config_path: Annotated[Path, typer.Argument(metavar="CONFIG.toml", help="SASRec training config "
                                                "(configs/sasrec-*.toml).")],
    data: Annotated[Path | None, typer.Option(help="Dataset directory (overrides [data] dir).")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Run directory (overrides [train] out_dir).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (overrides [train] steps).")] = None,
    nproc: Annotated[int, typer.Option(help="Worker processes on this node (1: in-process, no launcher).")] = 1,
    strategy: Annotated[str | None, typer.Option(help="ddp, fsdp (the item table sharded across ranks) or "
                                                 "diloco.")] = None,
    max_restarts: Annotated[int, typer.Option(help="Restart the worker group up to K times after a failure.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the run directory's latest complete checkpoint.")] = False,
    checkpoint_on_sigterm: Annotated[bool, typer.Option(help="On SIGTERM, finish the current step, checkpoint it "
                                                        "and exit 0.")] = True,
    metrics_port: Annotated[int | None, typer.Option(help="Rank 0 serves Prometheus /metrics (lmfleet_train:*) on this "
                                                     "port during the run (overrides [train] metrics_port; host: "
                                                     "train.metrics_host, 127.0.0.1).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override any setting: section.key=value, "
                                                           "e.g. model.hidden_size=64.")] = None,
) -> None:
    """Train SASRec with the distributed trainer: strategies, checkpoints, resume, SIGTERM,
    metrics and progress as in `train`; the model lands in RUN/final."""
    from lmfleet.recsys.train import RecsysTask
    from lmfleet.train import LaunchSpec

    config = _train_config(config_path, overrides, {"data.dir": data, "train.out_dir": out_dir,
                                                    "train.steps": steps, "train.strategy": strategy,
                                                    "train.metrics_port": metrics_port})
    _launch(config, LaunchSpec(nproc=nproc, max_restarts=max_restarts, resume=resume,
                               checkpoint_on_sigterm=checkpoint_on_sigterm), RecsysTask())


@recsys_app.command("eval")
def recsys_eval(
    model_dir: Annotated[Path, typer.Argument(help="A SASRec model directory (RUN/final).")],
    data: Annotated[Path, typer.Option(help="The dataset directory it was trained on.")],
    split: Annotated[str, typer.Option(help="test (the last item) or valid (the second-last).")] = "test",
    k: Annotated[int, typer.Option(help="Cut-off of HR@K and NDCG@K.")] = 10,
    negatives: Annotated[int, typer.Option(help="Sampled protocol: negatives per user.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the sampled negatives.")] = 0,
    max_users: Annotated[int | None, typer.Option(help="Score only the first N users.")] = None,
    baselines: Annotated[bool, typer.Option(help="Also popularity and item-kNN (catalogs up to 50,000 items) "
                                            "on the same split.")] = True,
    allow_other_data: Annotated[bool, typer.Option("--allow-other-data", help="Evaluate on a dataset other than "
                                                   "the one the model was trained on.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """HR@K and NDCG@K under full ranking and 100 sampled negatives, against popularity and item-kNN."""
    from lmfleet.recsys.evaluate import evaluate_model_dir

    result = evaluate_model_dir(model_dir, data, split, k, negatives, seed, max_users, baselines, allow_other_data)
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{model_dir} on {data} ({split}, {next(iter(result.values()))['full']['users']:,} users)")
    for column in ("scorer", f"full HR@{k}", f"full NDCG@{k}", f"sampled HR@{k}", f"sampled NDCG@{k}"):
        table.add_column(column, justify="right" if column != "scorer" else "left")
    for name, r in result.items():
        table.add_row(name, *(f"{r[p][m]:.4f}" for p in ("full", "sampled") for m in (f"hr@{k}", f"ndcg@{k}")))
    out.print(table)


@recsys_app.command("serve")
def recsys_serve(
    model_dir: Annotated[Path, typer.Argument(help="A SASRec model directory (RUN/final).")],
    data: Annotated[Path | None, typer.Option(help="The dataset whose users' histories to serve by user_id "
                                                   "(without it: histories come from /v1/events or the "
                                                   "request).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Accept this key (repeatable); also "
                                                         "LMFLEET_API_KEY (comma-separated). None: open.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File of API keys, one per line.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients use (default: the run's "
                                                             "directory name).")] = None,
    history_store: Annotated[str, typer.Option(help="Where posted events live: memory (this process) or "
                                               "redis://HOST:PORT/DB (shared by replicas).")] = "memory",
    store_prefix: Annotated[str, typer.Option(help="Prefix of the history store's Redis keys.")] = "lmfleet:recsys",
    max_events: Annotated[int, typer.Option(help="Events kept per user (the oldest go).")] = 200,
    max_users: Annotated[int, typer.Option(help="Users with events the in-memory store holds at most.")] = 1_000_000,
    max_batch: Annotated[int, typer.Option(help="Requests scored together at most (1: no batching).")] = 64,
    max_wait_ms: Annotated[float, typer.Option(help="How long a request waits for others to share its "
                                               "batch.")] = 2.0,
    max_queued: Annotated[int, typer.Option(help="Requests waiting for a batch before new ones get 429.")] = 2048,
    max_k: Annotated[int, typer.Option(help="Largest k a request may ask for.")] = 1000,
    cold_start: Annotated[str, typer.Option(help="A user with no history: popularity (the most popular "
                                            "items) or error (404).")] = "popularity",
    threads: Annotated[int | None, typer.Option(help="torch threads for scoring (default: torch's).")] = None,
    rate_limit: Annotated[float | None, typer.Option(help="Requests per second per API key; over it: 429.")] = None,
    rate_burst: Annotated[int | None, typer.Option(help="Burst size of the rate limit.")] = None,
    max_body_bytes: Annotated[str, typer.Option(help="Largest request body accepted (413 above).")] = "1MiB",
    protect_metrics: Annotated[bool, typer.Option("--protect-metrics", help="Require the API key on /metrics.")]
    = False,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (with --ssl-certfile: HTTPS).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Run N replicas on Ray Serve behind one endpoint (more "
                                                   "than one needs --history-store redis://...).")] = None,
    autoscale: Annotated[str | None, typer.Option(help="MIN:MAX replicas on Ray Serve, scaled on ongoing "
                                                     "requests.")] = None,
    target_ongoing_requests: Annotated[float, typer.Option(help="Autoscaling target per replica.")] = 32.0,
    upscale_delay: Annotated[float, typer.Option(help="Seconds of load before scaling up.")] = 3.0,
    downscale_delay: Annotated[float, typer.Option(help="Seconds of low load before scaling down.")] = 30.0,
    cpus_per_replica: Annotated[float, typer.Option(help="Ray CPUs per replica (also its torch threads).")] = 1.0,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local "
                                                       "one).")] = None,
    request_timeout: Annotated[float, typer.Option(help="On Ray Serve: seconds a request may take before "
                                                   "504.")] = 30.0,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get on SIGTERM.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve recommendations over HTTP: POST /v1/recommendations, POST /v1/events, /health, /metrics."""
    from lmfleet.recsys.serve import RecsysSettings, run_recsys_server
    from lmfleet.serve.auth import load_api_keys, open_exposure_warning
    from lmfleet.serve.server import parse_size

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} must be in 1..65535")
    keys = load_api_keys(api_key or [], api_key_file)
    exposure = open_exposure_warning(host, keys)
    if exposure is not None:
        console.print(f"[bold yellow]warning:[/] {escape(exposure)}", highlight=False, soft_wrap=True)
    model_path = Path(model_dir).resolve()
    name = served_model_name or (model_path.parent.name if model_path.name == "final" else model_path.name)
    settings = RecsysSettings(name, keys, max_batch, max_wait_ms, max_queued, max_k, max_events, max_users, cold_start,
                              history_store, store_prefix, parse_size(max_body_bytes, "--max-body-bytes"), rate_limit,
                              rate_burst, protect_metrics, threads).check()
    if data is not None:
        from lmfleet.recsys.data import RecData

        RecData(data)  # a bad dataset is an error now, not once Ray has started
    if replicas is not None or autoscale is not None:
        if ssl_keyfile is not None or ssl_certfile is not None:
            raise ConfigError("TLS is a single-server option; on Ray Serve terminate TLS at a proxy")
        from lmfleet.cluster.deploy import ClusterConfig, parse_autoscale
        from lmfleet.recsys.cluster import APP_NAME, deploy_recsys
        from lmfleet.recsys.model import load_sasrec

        load_sasrec(model_dir)  # a bad model directory is an error now
        config = ClusterConfig(replicas, parse_autoscale(autoscale) if autoscale is not None else None,
                               target_ongoing_requests, upscale_delay, downscale_delay, cpus_per_replica, 0.0, host,
                               port, "pow2", request_timeout_s=request_timeout,
                               graceful_shutdown_timeout_s=shutdown_timeout, ray_address=ray_address,
                               app_name=APP_NAME)
        _run_cluster(lambda: deploy_recsys(str(model_dir), None if data is None else str(data), settings, config),
                     name, config, shutdown_timeout, "/v1/recommendations")
        return
    scheme = "https" if ssl_certfile else "http"
    console.print(f"serving [bold]{name}[/] at {scheme}://{host}:{port}/v1/recommendations "
                  f"({'API key required' if keys else 'no API key'})")
    run_recsys_server(model_dir, settings, data, host, port, str(ssl_keyfile) if ssl_keyfile else None,
                      str(ssl_certfile) if ssl_certfile else None, shutdown_timeout, log_level)


# ---- engine ---------------------------------------------------------------------------------------

@export_app.command("gguf")
def export_gguf_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    out_file: Annotated[Path, typer.Argument(metavar="OUT.gguf", help="GGUF file to write.")],
    out_type: Annotated[str, typer.Option("--type", help="F32, F16, Q8_0 or Q4_0 (llama.cpp's own "
                                          "block formats).")] = "F16",
) -> None:
    """Write a GGUF file for llama.cpp / ollama."""
    from lmfleet.model.gguf_export import export_gguf

    path = export_gguf(model_dir, out_file, out_type.upper())
    out.print(f"wrote {path} ({_human_bytes(path.stat().st_size)}, {out_type.upper()})")


# ---- serve ---------------------------------------------------------------------------------------

@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[list[str] | None, typer.Option("--api-key", help="Accept this key (repeatable); also "
                                                         "LMFLEET_API_KEY (comma-separated). None: open.")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File of API keys, one per line.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model id clients use (default: the "
                                                             "directory name).")] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences decoded together at most.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Tokens per engine step at most.")] = 2048,
    max_queued_requests: Annotated[int, typer.Option(help="Requests waiting beyond the running batch before "
                                                     "new ones get 429.")] = 512,
    kv_cache_memory: Annotated[str | None, typer.Option(help="KV-cache size, e.g. 512MiB, 4GiB (default: "
                                                           "a share of free memory).")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="Context length cap (default: the model's).")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto.")] = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    no_prefix_caching: Annotated[bool, typer.Option("--no-prefix-caching", help="Turn prefix caching off.")] = False,
    enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help="No CUDA graphs for decode steps.")] = False,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of the GPU's memory the engine may use "
                                                               "(weights, activations, KV cache).")] = 0.9,
    linear_method: Annotated[str, typer.Option(help="How linear layers multiply: auto, packed (oneDNN, CPU fp32), "
                                                    "transposed (W^T, fastest for batch-1 decode on CPU) "
                                                    "or dense.")] = "auto",
    tensor_parallel_size: Annotated[int, typer.Option(help="Processes that each hold a slice of the model "
                                                      "and of the KV cache (1: this process alone).")] = 1,
    rate_limit: Annotated[float | None, typer.Option(help="Requests per second per API key (token bucket); "
                                                        "over it: 429.")] = None,
    rate_burst: Annotated[int | None, typer.Option(help="Burst size of the rate limit.")] = None,
    max_body_bytes: Annotated[str, typer.Option(help="Largest request body accepted (413 above).")] = "4MiB",
    protect_metrics: Annotated[bool, typer.Option("--protect-metrics", help="Require the API key on /metrics.")]
    = False,
    enable_priority: Annotated[bool, typer.Option("--enable-priority", help="Schedule by each request's "
                                                  "`priority` (off: a request that sets it gets 400).")] = False,
    enable_docs: Annotated[bool, typer.Option("--enable-docs", help="Serve /docs, /redoc and /openapi.json "
                                              "(off by default: they describe the API to anyone).")] = False,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (with --ssl-certfile: HTTPS).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain.")] = None,
    replicas: Annotated[int | None, typer.Option(help="Run N replicas on Ray Serve behind one endpoint.")] = None,
    autoscale: Annotated[str | None, typer.Option(help="MIN:MAX replicas on Ray Serve, scaled on ongoing "
                                                     "requests.")] = None,
    target_ongoing_requests: Annotated[float, typer.Option(help="Autoscaling target per replica.")] = 8.0,
    upscale_delay: Annotated[float, typer.Option(help="Seconds of load before scaling up.")] = 3.0,
    downscale_delay: Annotated[float, typer.Option(help="Seconds of low load before scaling down.")] = 30.0,
    cpus_per_replica: Annotated[float, typer.Option(help="Ray CPUs per replica (also its torch threads).")] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(help="Ray GPUs per replica.")] = 0.0,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster (default: start a local one; "
                                                       "'auto': the one on this node). A cluster with token "
                                                       "auth needs RAY_AUTH_MODE=token and its token in "
                                                       "~/.ray/auth_token.")] = None,
    router: Annotated[str, typer.Option(help="Replica choice: prefix (prefix affinity + least load) or pow2 "
                                        "(Ray Serve's default).")] = "prefix",
    request_timeout: Annotated[float, typer.Option(help="On Ray Serve: seconds a request may take before 504 "
                                                   "(or an error event on a stream).")] = 600.0,
    graceful_shutdown_timeout: Annotated[float, typer.Option(help="On Ray Serve: seconds a replica being stopped "
                                                             "(scale-down, redeploy) gets to finish its requests.")]
    = 30.0,
    grpc_port: Annotated[int | None, typer.Option(help="Also serve the lmfleet.v1 gRPC API on this port "
                                                     "(same host, keys and limits).")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on "
                                                    "SIGTERM.")] = 30.0,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models) with
    /health, /metrics (Prometheus) and /version."""
    from lmfleet.serve.auth import load_api_keys, open_exposure_warning
    from lmfleet.serve.frontend import ServeSettings
    from lmfleet.serve.server import check_inputs, engine_options, parse_size, run_server

    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} must be in 1..65535")
    if max_queued_requests < 0:
        raise ConfigError(f"--max-queued-requests {max_queued_requests} must be >= 0")
    from lmfleet.engine.linear import check_linear_method
    check_linear_method(linear_method)
    keys = load_api_keys(api_key or [], api_key_file)
    exposure = open_exposure_warning(host, keys)
    if exposure is not None:
        console.print(f"[bold yellow]warning:[/] {escape(exposure)}", highlight=False, soft_wrap=True)
    name = served_model_name or Path(model_dir).resolve().name
    if grpc_port is not None:
        if not 0 < grpc_port < 65536 or grpc_port == port:
            raise ConfigError(f"--grpc-port {grpc_port} must be in 1..65535 and differ from --port")
        from lmfleet.serve.grpc_server import load_protos

        load_protos()  # the grpc extra is installed, or a clear error now
    ssl_key, ssl_cert = (str(ssl_keyfile) if ssl_keyfile else None), (str(ssl_certfile) if ssl_certfile else None)
    settings = ServeSettings(name, keys, max_queued_requests, parse_size(max_body_bytes, "--max-body-bytes"),
                             rate_limit, rate_burst, protect_metrics, grpc_port, host, ssl_key, ssl_cert,
                             enable_docs, enable_priority)
    engine_kwargs = engine_options(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   dtype=dtype, device=device, max_model_len=max_model_len,
                                   no_prefix_caching=no_prefix_caching, enforce_eager=enforce_eager,
                                   gpu_memory_utilization=gpu_memory_utilization, linear_method=linear_method,
                                   tensor_parallel_size=tensor_parallel_size, kv_cache_memory=kv_cache_memory)
    check_inputs(model_dir, ssl_key, ssl_cert)
    if replicas is not None or autoscale is not None:
        if grpc_port is not None or ssl_key is not None:
            raise ConfigError("--grpc-port and TLS are single-server options; on Ray Serve terminate TLS at a proxy")
        from lmfleet.cluster.deploy import ClusterConfig, parse_autoscale

        config = ClusterConfig(replicas, parse_autoscale(autoscale) if autoscale is not None else None,
                               target_ongoing_requests, upscale_delay, downscale_delay, cpus_per_replica,
                               gpus_per_replica, host, port, router, request_timeout_s=request_timeout,
                               graceful_shutdown_timeout_s=graceful_shutdown_timeout, ray_address=ray_address)
        _serve_cluster(model_dir, settings, engine_kwargs, config, shutdown_timeout)
        return
    scheme = "https" if ssl_certfile else "http"
    console.print(f"serving [bold]{name}[/] at {scheme}://{host}:{port}/v1"
                  + (f" and gRPC {host}:{grpc_port}" if grpc_port else "")
                  + f" ({'API key required' if keys else 'no API key'})")
    run_server(model_dir, settings, engine_kwargs, host, port, ssl_key, ssl_cert, shutdown_timeout, log_level)


def _serve_cluster(model_dir: Path, settings: object, engine_kwargs: dict, config: object,
                   shutdown_timeout: float) -> None:
    from lmfleet.cluster.deploy import deploy

    _run_cluster(lambda: deploy(str(model_dir), settings, engine_kwargs, config), settings.model_name, config,
                 shutdown_timeout, "/v1")


def _run_cluster(deploy_app: object, name: str, config: object, shutdown_timeout: float, path: str) -> None:
    """Deploy on Ray Serve (`deploy_app()` returns warnings), then wait for SIGTERM/SIGINT, let
    in-flight requests finish and take everything down."""
    import signal
    import threading

    from lmfleet.cluster.deploy import AppAlreadyRunning, disconnect, drain, shutdown

    stop = threading.Event()

    def catch_signals() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    catch_signals()
    owned = True  # take the application down at the end (not someone else's that was already there)
    try:
        try:
            warnings = deploy_app()
        except AppAlreadyRunning:
            owned = False
            raise
        catch_signals()  # ray.init installs its own SIGTERM handler, which would end the process at once
        for warning in warnings:
            console.print(f"[yellow]warning:[/] {warning}")
        shape = f"{config.replicas} replicas" if config.replicas else \
            f"{config.autoscale[0]}-{config.autoscale[1]} replicas (autoscaling)"
        console.print(f"serving [bold]{name}[/] on Ray Serve, {shape}, at "
                      f"http://{config.host}:{config.port}{path} "
                      "(Ctrl-C or SIGTERM stops it)")
        stop.wait()
        console.print(f"stopping: in-flight requests get up to {shutdown_timeout:g} s to finish")
        cut = drain(shutdown_timeout, config.app_name)
        if cut:
            console.print(f"[yellow]warning:[/] {cut} request(s) still running after {shutdown_timeout:g} s were cut")
    finally:
        if owned:
            shutdown(config.app_name)
        else:
            disconnect()


@app.command()
def status(
    ray_address: Annotated[str, typer.Option(help="The Ray cluster ('auto': the one on this node).")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Replicas of the lmfleet deployment on a Ray cluster (language models or recommender): their state,
    load and health."""
    from lmfleet.cluster.status import cluster_status

    result = cluster_status(ray_address)
    if as_json:
        print(json.dumps(result))
        return
    out.print(f"application {result['name']}: {result['application']}")
    for name, d in result["deployments"].items():
        out.print(f"  {name}: {d['status']}, replicas {d['replicas']}")
    table = Table(title="replicas")
    recsys = result["kind"] == "recsys"
    load = ("waiting", "requests", "events", "store errors") if recsys else (
        "running", "waiting", "kv cache", "generated tokens")
    for column in ("replica", "node", "pid", *load, "last report"):
        table.add_column(column)
    for r in result["replicas"]:
        values = ((r["waiting"], r["requests"], r["events"], r["store_errors"]) if recsys else
                  (r["running"], r["waiting"], f"{r['kv_cache_usage']:.0%}", r["generation_tokens"]))
        table.add_row(r["replica"], r["node"], str(r["pid"]), *(v if isinstance(v, str) else f"{v:g}" for v in values),
                      f"{r['age_s']:.1f} s ago")
    out.print(table)


@bench_app.command("offline")
def bench_offline(
    model_dir: Annotated[Path, typer.Argument(help="Model directory (Hugging Face layout).")],
    num_prompts: Annotated[int, typer.Option(help="Requests to run.")] = 64,
    input_len_range: Annotated[str, typer.Option(help="Prompt tokens, N or A:B.")] = "32:256",
    output_len_range: Annotated[str, typer.Option(help="Output tokens, N or A:B.")] = "32:128",
    prefix_len: Annotated[int, typer.Option(help="Tokens of a prefix shared by every prompt.")] = 0,
    max_num_seqs: Annotated[int, typer.Option(help="Sequences decoded together at most.")] = 64,
    max_num_batched_tokens: Annotated[int, typer.Option(help="Tokens per engine step at most.")] = 2048,
    dtype: Annotated[str, typer.Option(help="fp32, bf16, fp16 or auto.")] = "fp32",
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    enforce_eager: Annotated[bool, typer.Option("--enforce-eager", help="No CUDA graphs for decode steps.")] = False,
    gpu_memory_utilization: Annotated[float, typer.Option(help="Share of the GPU's memory the engine may use.")] = 0.9,
    tensor_parallel_size: Annotated[int, typer.Option(help="Processes that each hold a slice of the model "
                                                      "and of the KV cache (1: this process alone).")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Offline throughput: requests/s, output and total tokens/s, prefix-cache hit rate."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmfleet.engine import LLMEngine
    from lmfleet.engine.bench import offline_benchmark, parse_range

    input_len = parse_range(input_len_range, "--input-len-range")
    output_len = parse_range(output_len_range, "--output-len-range")
    engine = LLMEngine(model_dir, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       dtype=dtype, device=device, enforce_eager=enforce_eager,
                       gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size)
    with Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("bench", total=num_prompts)
        try:
            result = offline_benchmark(engine, num_prompts, input_len, output_len, prefix_len,
                                       progress=lambda done, total: bar.update(task, completed=done))
        finally:
            engine.shutdown()
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"offline benchmark: {model_dir}", show_header=False)
    for key, value in result.items():
        table.add_row(key, f"{value:,.2f}" if isinstance(value, float) else str(value))
    out.print(table)


@bench_app.command("serve")
def bench_serve(
    url: Annotated[str, typer.Option(help="Base URL of an OpenAI-compatible server.")] = "http://127.0.0.1:8000",
    num_prompts: Annotated[int, typer.Option(help="Requests to send.")] = 100,
    concurrency: Annotated[int | None, typer.Option(help="Closed loop: requests in flight at most.")] = None,
    request_rate: Annotated[float | None, typer.Option(help="Open loop: Poisson arrivals, requests/s.")] = None,
    dataset: Annotated[str, typer.Option(help="random, or prefix (shared prefixes, see --prefix-len).")] = "random",
    input_len_range: Annotated[str, typer.Option(help="Prompt tokens (after any prefix), N or A:B.")] = "32:256",
    output_len_range: Annotated[str, typer.Option(help="Output tokens, N or A:B.")] = "32:128",
    prefix_len: Annotated[int, typer.Option(help="Tokens of each shared prefix (--dataset prefix).")] = 256,
    num_prefixes: Annotated[int, typer.Option(help="Distinct shared prefixes (--dataset prefix).")] = 4,
    token_id_range: Annotated[str, typer.Option(help="Prompt token ids drawn from [A, B).")] = "100:1000",
    stream: Annotated[bool, typer.Option("--stream/--no-stream", help="Stream (TTFT and ITL need it).")] = True,
    model: Annotated[str | None, typer.Option(help="Model id (default: the server's first).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default: LMFLEET_API_KEY).",
                                                   envvar="LMFLEET_API_KEY")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic requests.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Serving benchmark over HTTP: TTFT, TPOT, ITL, end-to-end latency, throughput, failures."""
    import asyncio

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lmfleet.engine.bench import parse_range
    from lmfleet.serve.bench import BenchConfig, run_benchmark

    lo, hi = parse_range(token_id_range, "--token-id-range")
    cfg = BenchConfig(url, num_prompts, concurrency, request_rate, dataset,
                      parse_range(input_len_range, "--input-len-range"),
                      parse_range(output_len_range, "--output-len-range"), prefix_len, num_prefixes,
                      (lo, hi), stream, model, api_key, seed)
    with Progress(TextColumn("[bold]requests"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("bench", total=num_prompts)
        result = asyncio.run(run_benchmark(cfg, lambda done, total: bar.update(task, completed=done)))
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"serving benchmark: {url} ({result['model']})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v * 1e3:,.1f} ms" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:,.2f}"
        table.add_row(key, str(value))
    out.print(table)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 1, never a traceback."""
    try:
        app()
    except LmfleetError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
