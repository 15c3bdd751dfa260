"""Distributed training end to end on CPU/gloo: each distributed run is checked against a
single-process run, an uninterrupted run, or an independent computation. Runs that decompose the
same computation differently (1 vs 2 processes, DDP vs FSDP) are compared in float64; resumed runs
against the uninterrupted one in fp32."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmfleet.data.corpus import Corpus, prepare_corpus, stdlib_root
from lmfleet.model import load_model
from lmfleet.train.checkpointing import complete_checkpoints, read_meta
from lmfleet.train.metrics import read_metrics

from .helpers import assert_one_line_error, run_cli

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.toml"
STEPS, CKPT = 12, 6
FP64 = ("--set", "train.precision=fp64")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "corpus"
    prepare_corpus([str(stdlib_root() / "json"), str(stdlib_root() / "email")], out, vocab_size=512,
                   val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


def train(corpus: Path, out: Path, *args: str, env: dict[str, str] | None = None, nproc: int = 2,
          micro_batch: int = 4):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lmfleet.cli", "train", str(CONFIG), "--data", str(corpus), "--out", str(out),
           "--steps", str(STEPS), "--checkpoint-every", str(CKPT), "--nproc", str(nproc),
           "--set", f"batch.micro_batch={micro_batch}", "--set", "eval.every=6", "--set", "diloco.inner_steps=4",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def ok(result) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"}


@pytest.fixture(scope="module")
def ddp_run(corpus, runs) -> Path:
    ok(train(corpus, runs / "ddp"))
    return runs / "ddp"


@pytest.fixture(scope="module")
def ddp64_run(corpus, runs) -> Path:
    """The reference for runs that decompose the same computation differently: in float64, so they
    agree to float64 rounding whatever the CPU's kernels (in fp32 Adam amplifies those to ~1e-5)."""
    ok(train(corpus, runs / "ddp64", *FP64))
    return runs / "ddp64"


@pytest.fixture(scope="module")
def diloco_run(corpus, runs) -> Path:
    ok(train(corpus, runs / "diloco", "--strategy", "diloco"))
    return runs / "diloco"


def test_ddp_equals_single_process_with_double_batch(corpus, runs, ddp64_run) -> None:
    ok(train(corpus, runs / "single64", *FP64, nproc=1, micro_batch=8))
    single = weights(runs / "single64")
    assert next(iter(single.values())).dtype == torch.float64  # the run was float64 end to end
    assert max_diff(single, weights(ddp64_run)) <= 1e-10
    single_losses, ddp_losses = train_losses(runs / "single64"), train_losses(ddp64_run)
    assert all(abs(single_losses[s] - ddp_losses[s]) <= 1e-10 for s in range(1, STEPS + 1))


def test_fsdp_equals_ddp(corpus, runs, ddp64_run) -> None:
    ok(train(corpus, runs / "fsdp64", *FP64, "--strategy", "fsdp"))
    fsdp = weights(runs / "fsdp64")
    assert next(iter(fsdp.values())).dtype == torch.float64
    assert max_diff(fsdp, weights(ddp64_run)) <= 1e-10
    fsdp_losses, ddp_losses = train_losses(runs / "fsdp64"), train_losses(ddp64_run)
    assert all(abs(fsdp_losses[s] - ddp_losses[s]) <= 1e-10 for s in range(1, STEPS + 1))
    meta = read_meta(complete_checkpoints(runs / "fsdp64")[-1][1])
    assert meta["step"] == STEPS and meta["strategy"] == "fsdp"


@pytest.mark.parametrize("strategy", ["ddp", "diloco"])
def test_exact_resume(strategy, corpus, runs, ddp_run, diloco_run) -> None:
    reference = {"ddp": ddp_run, "diloco": diloco_run}[strategy]
    out = runs / f"resume-{strategy}"
    # Stop the run for good after CKPT steps (SIGKILL, no restarts), then resume it.
    stopped = train(corpus, out, "--strategy", strategy, env={"LMFLEET_FAULT_STEP": str(CKPT)})
    assert stopped.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [CKPT]
    ok(train(corpus, out, "--strategy", strategy, "--resume"))
    assert max_diff(weights(out), weights(reference)) <= 1e-6
    assert train_losses(out) == train_losses(reference)  # every step's loss, bit for bit


def test_worker_killed_group_restarts_and_finishes(corpus, runs, ddp_run) -> None:
    out = runs / "fault"
    result = train(corpus, out, "--max-restarts", "1", env={"LMFLEET_FAULT_STEP": "9", "LMFLEET_FAULT_RANK": "1"})
    ok(result)
    meta = read_meta(complete_checkpoints(out)[-1][1])
    assert meta["step"] == STEPS
    assert load_model(out / "final").config.num_hidden_layers == 4
    # The restarted group resumed from step 6 and ended where the uninterrupted run did.
    assert max_diff(weights(out), weights(ddp_run)) <= 1e-6


def test_diloco_communicates_less_and_learns(ddp_run, diloco_run) -> None:
    def comm_per_token(run: Path) -> float:
        last = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][-1]
        return last["comm_bytes_total"] / last["tokens"]

    ratio = comm_per_token(ddp_run) / comm_per_token(diloco_run)
    assert 0.8 * 4 <= ratio <= 1.2 * 4  # H = 4 inner steps per outer all-reduce
    evals = [r for r in read_metrics(diloco_run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == STEPS
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5


def test_loss_decreases_and_export_matches_transformers(ddp_run, corpus) -> None:
    losses = train_losses(ddp_run)
    assert losses[STEPS] < losses[1] - 0.5
    ours = load_model(ddp_run / "final")
    hf = transformers.AutoModelForCausalLM.from_pretrained(ddp_run / "final").eval()
    ids = torch.from_numpy(Corpus(corpus).tokens("val")[:64].astype("int64"))[None]
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4


def test_eval_command_matches_independent_perplexity(ddp_run, corpus) -> None:
    result = run_cli("eval", str(ddp_run / "final"), "--data", str(corpus), "--seq-len", "32", "--max-tokens",
                     "640", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ddp_run / "final").eval()
    val = torch.from_numpy(Corpus(corpus).tokens("val").astype("int64"))
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 640, 32):
            window = val[start:start + 33][None]
            logits = hf(window[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    assert report["tokens"] == count == 640
    assert math.isclose(report["perplexity"], math.exp(total / count), rel_tol=1e-5)


def test_plot_writes_png(ddp_run) -> None:
    result = run_cli("plot", str(ddp_run))
    assert result.returncode == 0, result.stderr
    png = (ddp_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 300


def test_bad_input_fails_before_workers_start(corpus, runs, ddp_run, tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.read_text().replace("[optim]\n", "[optim]\nlearning_rate = 1.0\n"))
    result = run_cli("train", str(bad), "--data", str(corpus), "--out", str(tmp_path / "r1"))
    assert_one_line_error(result, "optim.learning_rate")
    assert not (tmp_path / "r1").exists()
    assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(tmp_path), "--out", str(tmp_path / "r2")),
                    "no manifest.json")
    assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(tmp_path / "r3"),
                            "--nproc", "512"), "--nproc=512 is larger than this machine allows")
    assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(tmp_path / "r4"),
                            "--set", "model.hidden_size=100", "--set", "model.num_attention_heads=3"),
                    "num_attention_heads=3 does not divide hidden_size=100")
    # Resuming the 2-process DDP run with another world size or model shape.
    copy = tmp_path / "copy"
    shutil.copytree(ddp_run, copy)
    base = ["train", str(CONFIG), "--data", str(corpus), "--out", str(copy), "--set", "batch.micro_batch=4",
            "--steps", str(STEPS), "--resume"]
    assert_one_line_error(run_cli(*base, "--nproc", "1"), "written by 2 processes, this run has 1")
    assert_one_line_error(run_cli(*base, "--nproc", "2", "--set", "model.num_hidden_layers=2"),
                    "num_hidden_layers (4 vs 2)")
    assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(copy)),
                    "already holds checkpoints")
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_12", "step_6"]
