"""Distributed training end to end on CPU/gloo: each distributed run is checked against a
single-process run, an uninterrupted run, or an independent computation. Runs that decompose the
same computation differently (1 vs 2 processes, DDP vs FSDP) are compared in float64; resumed runs
against the uninterrupted one in fp32, bit for bit."""

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
def other_corpus(corpus, tmp_path_factory) -> Path:
    """Other text through the same tokenizer: the same model fits it, the data differs."""
    out = tmp_path_factory.mktemp("train") / "other"
    prepare_corpus([str(stdlib_root() / "html")], out, tokenizer=corpus, val_fraction=0.1)
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


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == kind]


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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
    assert bit_identical(weights(out), weights(reference))
    assert train_losses(out) == train_losses(reference)  # every step's loss, bit for bit


def test_worker_killed_group_restarts_and_finishes(corpus, runs, ddp_run) -> None:
    out = runs / "fault"
    result = train(corpus, out, "--max-restarts", "1", env={"LMFLEET_FAULT_STEP": "9", "LMFLEET_FAULT_RANK": "1"})
    ok(result)
    # Two attempts in two sets of processes: the first got to step 9 and died, the second
    # (torchrun's restart 1) resumed from the step-6 checkpoint.
    first, second = records(out, "start")
    assert (first["attempt"], first["resumed_from"]) == (0, None)
    assert (second["attempt"], second["resumed_from"], second["previous_last_step"]) == (1, "step_6", 9)
    assert first["pid"] != second["pid"]
    assert "restart 1: resuming from" in result.stderr
    meta = read_meta(complete_checkpoints(out)[-1][1])
    assert meta["step"] == STEPS
    assert load_model(out / "final").config.num_hidden_layers == 4
    # ... and ended where the uninterrupted run did.
    assert bit_identical(weights(out), weights(ddp_run))
    assert train_losses(out) == train_losses(ddp_run)


def test_sigterm_checkpoints_the_step_and_exits_0(corpus, runs, ddp_run) -> None:
    """SIGTERM to the `lmfleet train` process during step 3 (sent by rank 0's test hook, so it
    lands at a known step; the workers hear of it only from the launcher): the workers finish
    step 3, checkpoint it and the command exits 0; --resume then ends bit for bit where the
    uninterrupted run did."""
    out = runs / "sigterm"
    stopped = train(corpus, out, env={"LMFLEET_SIGTERM_STEP": "3"})
    ok(stopped)
    assert "stopped by SIGTERM after step 3" in stopped.stdout
    assert [s for s, _ in complete_checkpoints(out)] == [3]
    assert read_meta(out / "checkpoints" / "step_3")["stopped_by"] == "SIGTERM"
    assert sorted(train_losses(out)) == [1, 2, 3] and not (out / "final").exists()
    assert [r["step"] for r in records(out, "stop")] == [3]
    ok(train(corpus, out, "--resume"))
    assert bit_identical(weights(out), weights(ddp_run))
    assert train_losses(out) == train_losses(ddp_run)


def test_resume_skips_a_checkpoint_cut_short(corpus, runs, ddp_run) -> None:
    """The newest checkpoint lost half a file (a crash, a full disk): --resume says so, takes the
    one before, and still ends where the uninterrupted run did."""
    out = runs / "cut"
    shutil.copytree(ddp_run, out)
    shutil.rmtree(out / "final")
    cut = out / "checkpoints" / "step_12" / "rank_1.pt"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (out / "checkpoints" / ".step_18.tmp").mkdir()  # what a save that crashed leaves
    result = train(corpus, out, "--resume")
    ok(result)
    assert "resuming from" in result.stderr and "step_6 (skipped step_12: rank_1.pt holds" in result.stderr
    assert records(out, "start")[-1]["resumed_from"] == "step_6"
    assert bit_identical(weights(out), weights(ddp_run))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_12", "step_6"]
    assert [s for s, _ in complete_checkpoints(out)] == [6, 12]


def test_resume_takes_a_complete_save_whose_rename_never_happened(corpus, runs, ddp_run) -> None:
    """A crash between a save's last fsync and its rename leaves a complete `.step_12.tmp`: the
    launcher puts it in place before it picks, so --resume starts from step 12, not step 6."""
    out = runs / "unrenamed"
    shutil.copytree(ddp_run, out)
    shutil.rmtree(out / "final")
    (out / "checkpoints" / "step_12").rename(out / "checkpoints" / ".step_12.tmp")
    result = train(corpus, out, "--resume")
    ok(result)
    assert f"resuming from {out / 'checkpoints' / 'step_12'}" in result.stderr
    assert records(out, "start")[-1]["resumed_from"] == "step_12"
    assert bit_identical(weights(out), weights(ddp_run))


def test_a_new_run_never_lands_on_checkpoints_it_cannot_read(corpus, runs, ddp_run) -> None:
    """Checkpoints without a manifest (an older lmfleet's) are not "no checkpoints": a run
    without --resume is refused and they stay as they were."""
    out = runs / "legacy"
    shutil.copytree(ddp_run, out)
    for step in (6, 12):
        (out / "checkpoints" / f"step_{step}" / "manifest.json").unlink()
    (out / "checkpoints" / ".step_18.tmp").mkdir()  # perhaps a run saving right now: not this run's to clear
    (out / "checkpoints" / ".step_18.tmp" / "rank_0.pt").write_bytes(b"being written")
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    refused = run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(out), "--nproc", "2",
                      "--set", "batch.micro_batch=4", "--steps", str(STEPS))
    assert_one_line_error(refused, "already holds checkpoints", "none complete; step_12: no manifest.json",
                          "--resume")
    assert {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == before


def test_resume_refuses_another_corpus_unless_allowed(corpus, other_corpus, runs, ddp_run) -> None:
    out = runs / "newdata"
    shutil.copytree(ddp_run, out)
    shutil.rmtree(out / "checkpoints" / "step_12")
    refused = run_cli("train", str(CONFIG), "--data", str(other_corpus), "--out", str(out), "--nproc", "2",
                      "--set", "batch.micro_batch=4", "--steps", str(STEPS), "--resume")
    assert_one_line_error(refused, "cannot resume from", "step_6", f"trained on corpus {corpus.resolve()}",
                          f"--data {other_corpus.resolve()} is another corpus", "--allow-new-data")
    ok(train(other_corpus, out, "--resume", "--allow-new-data"))
    losses, reference = train_losses(out), train_losses(ddp_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(losses[s] != reference[s] for s in range(CKPT + 1, STEPS + 1))  # steps 7-12 saw the new text
    assert read_meta(out / "checkpoints" / f"step_{STEPS}")["corpus"]["path"] == str(other_corpus.resolve())


def test_diloco_communicates_less_and_learns(ddp_run, diloco_run) -> None:
    """Bytes counted at the collectives (DDP's gradient buckets, DiLoCo's all-reduce) against the
    parameter count of the exported model: every step's gradients for DDP, the parameters once
    per H = 4 steps for DiLoCo."""
    final = weights(ddp_run)
    param_bytes = 4 * sum(t.numel() for t in final.values())  # fp32; the tied head is stored once
    assert "lm_head.weight" not in final and load_model(ddp_run / "final").config.tie_word_embeddings
    ddp, diloco = records(ddp_run, "train"), records(diloco_run, "train")
    assert [r["comm_bytes"] for r in ddp] == [param_bytes] * STEPS
    assert all(r["comm_calls"] >= 1 for r in ddp)  # one all-reduce per gradient bucket
    outer = {4, 8, 12}
    assert [r["comm_bytes"] for r in diloco] == [param_bytes if r["step"] in outer else 0 for r in diloco]
    assert [r["comm_calls"] for r in diloco] == [1 if r["step"] in outer else 0 for r in diloco]
    assert ddp[-1]["comm_bytes_total"] == STEPS * param_bytes
    assert diloco[-1]["comm_bytes_total"] == len(outer) * param_bytes == ddp[-1]["comm_bytes_total"] / 4
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
