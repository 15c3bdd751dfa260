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
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers
from safetensors.torch import load_file

from lmfleet.data.corpus import Corpus, prepare_corpus, stdlib_root
from lmfleet.model import load_model
from lmfleet.train.checkpointing import complete_checkpoints, read_meta
from lmfleet.train.metrics import read_metrics

from .helpers import assert_one_line_error, free_port, run_cli

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.toml"
STEPS, CKPT = 12, 6
FP64 = ("--set", "train.precision=fp64")
UNTIED = ("--set", "model.tie_word_embeddings=false")  # a pipeline keeps embedding and LM head apart


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


def train_command(corpus: Path, out: Path, *args: str, nproc: int = 2, micro_batch: int = 4) -> list[str]:
    return [sys.executable, "-m", "lmfleet.cli", "train", str(CONFIG), "--data", str(corpus), "--out", str(out),
            "--steps", str(STEPS), "--checkpoint-every", str(CKPT), "--nproc", str(nproc),
            "--set", f"batch.micro_batch={micro_batch}", "--set", "eval.every=6", "--set", "diloco.inner_steps=4",
            *args]


def train(corpus: Path, out: Path, *args: str, env: dict[str, str] | None = None, nproc: int = 2,
          micro_batch: int = 4):
    return subprocess.run(train_command(corpus, out, *args, nproc=nproc, micro_batch=micro_batch),
                          capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


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


def _scrape(url: str) -> dict[str, float] | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None
    if response.status_code != 200:
        return None
    return {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in response.text.splitlines()
            if line.startswith("lmfleet_train:")}


def test_rank0_serves_training_metrics_that_agree_with_the_log_across_a_restart(corpus, runs, ddp_run) -> None:
    """`--metrics-port`: while a 2-process run trains, dies at step 9 and restarts, rank 0's
    /metrics shows each step's loss exactly as metrics.jsonl logs it, the restart count, the run's
    size and the checkpoint age; the endpoint goes away with the run."""
    out, port = runs / "metrics-port", free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    env = {**os.environ, "LMFLEET_FAULT_STEP": "9", "LMFLEET_FAULT_RANK": "1"}
    log = runs / "metrics-port.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen(train_command(corpus, out, "--max-restarts", "1", "--metrics-port", str(port),
                                              "--set", "train.log_every=2"),
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
    scrapes = []
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            scraped = _scrape(url)
            if scraped:
                scrapes.append(scraped)
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-3000:]
    assert _scrape(url) is None  # gone with the run
    # metrics.jsonl logs every second step (log_every=2); /metrics shows every step: the odd ones'
    # losses are the uninterrupted run's (the resumed run replays steps 7-9 bit for bit).
    losses = {**train_losses(ddp_run), **train_losses(out)}
    stepped = [s for s in scrapes if "lmfleet_train:loss" in s]
    assert stepped, f"no scrape during training ({len(scrapes)} scrapes)"
    assert all(step % 2 == 0 for step in train_losses(out))
    for scraped in stepped:
        assert scraped["lmfleet_train:loss"] == losses[int(scraped["lmfleet_train:step"])], scraped
        assert scraped["lmfleet_train:total_steps"] == STEPS and scraped["lmfleet_train:world_size"] == 2
        assert scraped["lmfleet_train:tokens_per_second"] > 0
    # The restart count as scraped over time: 0 in the first attempt (when a scrape caught it), then
    # 1 once the group restarted, never back.
    restarts = [s["lmfleet_train:restarts_total"] for s in scrapes]
    assert restarts == sorted(restarts) and restarts[-1] == 1.0 and set(restarts) <= {0.0, 1.0}, restarts
    aged = [s["lmfleet_train:checkpoint_age_seconds"] for s in scrapes if "lmfleet_train:checkpoint_age_seconds" in s]
    assert aged and all(0 <= a < 300 for a in aged)


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
    assert report["size_bytes"] == (ddp_run / "final" / "model.safetensors").stat().st_size
    assert report["decode_tok_s_batch1"] > 0 and report["decode_tok_s_batch16"] > 0


def test_plot_writes_png(ddp_run) -> None:
    result = run_cli("plot", str(ddp_run))
    assert result.returncode == 0, result.stderr
    png = (ddp_run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 400 and height > 300


def test_bad_input_fails_before_workers_start(corpus, runs, ddp_run, diloco_run, tmp_path) -> None:
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
    assert_one_line_error(run_cli(*base, "--nproc", "2", "--set", "model.num_hidden_layers=2"),
                    "num_hidden_layers (4 vs 2)")
    assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(copy)),
                    "already holds checkpoints")
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step_12", "step_6"]
    # A DiLoCo run resumes only at its own world size (each rank's replica is its own).
    copy = tmp_path / "diloco"
    shutil.copytree(diloco_run, copy)
    assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(copy), "--resume",
                                  "--set", "batch.micro_batch=8", "--strategy", "diloco", "--steps", str(STEPS)),
                          "written by 2 processes, this run has 1", "DiLoCo")
    # Model-parallel degrees the model or the world size cannot take, refused before any worker.
    one_head = ["--set", "model.num_attention_heads=1", "--set", "model.num_key_value_heads=1"]
    for args, needle in [(["--nproc", "2", "--tp", "2", *one_head], "does not divide num_attention_heads=1"),
                         (["--nproc", "2", "--pp", "2"], "tie_word_embeddings=true"),
                         (["--nproc", "2", "--pp", "2", "--set", "model.num_hidden_layers=1", *UNTIED],
                          "pp=2 is larger than num_hidden_layers=1"),
                         (["--nproc", "1", "--tp", "2"], "world size 1 is not a multiple of parallel.tp x parallel.pp"),
                         (["--nproc", "2", "--tp", "2", "--strategy", "fsdp"], "runs with strategy 'ddp'"),
                         (["--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:1"], "needs batch.global_batch"),
                         (["--nnodes", "1:2", "--rdzv-endpoint", "127.0.0.1:1", "--strategy", "diloco"],
                          "cannot change its world size"),
                         (["--nproc", "2", "--pp", "2", *UNTIED], "needs at least 2 micro-batches per step"),
                         (["--nnodes", "2:1"], "need 1 <= MIN <= MAX")]:
        out = tmp_path / "mp"
        assert_one_line_error(run_cli("train", str(CONFIG), "--data", str(corpus), "--out", str(out), *args), needle)
        assert not out.exists()


# ---- model parallelism and elastic training -------------------------------------------------------
# Short float64 runs with an untied LM head, 8 sequences per step: one process (micro-batch 4, two
# accumulation steps) against TP=2 (one data-parallel rank) and PP=2 (two micro-batches).

MP_STEPS, MP_CKPT = 6, 3
MP = (*FP64, *UNTIED, "--steps", str(MP_STEPS), "--checkpoint-every", str(MP_CKPT), "--set", "eval.every=3",
      "--set", "batch.grad_accum=2")


@pytest.fixture(scope="module")
def mp_single(corpus, runs) -> Path:
    ok(train(corpus, runs / "mp-single", *MP, nproc=1))
    return runs / "mp-single"


@pytest.fixture(scope="module")
def tp_run(corpus, runs) -> Path:
    ok(train(corpus, runs / "mp-tp2", *MP, "--tp", "2"))
    return runs / "mp-tp2"


@pytest.fixture(scope="module")
def pp_run(corpus, runs) -> Path:
    ok(train(corpus, runs / "mp-pp2", *MP, "--pp", "2"))
    return runs / "mp-pp2"


def eval_losses(run: Path) -> list[float]:
    return [r["val_loss"] for r in records(run, "eval")]


def assert_same_training(run: Path, reference: Path, tol: float) -> None:
    """Every step's loss and every evaluation within `tol`; exported weights too."""
    losses, expected = train_losses(run), train_losses(reference)
    assert sorted(losses) == sorted(expected)
    assert all(abs(losses[s] - expected[s]) <= tol for s in expected), (losses, expected)
    assert len(eval_losses(run)) == len(eval_losses(reference))
    assert all(abs(a - b) <= tol for a, b in zip(eval_losses(run), eval_losses(reference)))
    assert max_diff(weights(run), weights(reference)) <= tol


def test_tensor_parallel_training_equals_one_process(tp_run, mp_single) -> None:
    assert read_meta(complete_checkpoints(tp_run)[-1][1])["parallel"] == {"dp": 1, "tp": 2, "pp": 1}
    assert_same_training(tp_run, mp_single, 1e-10)
    assert load_model(tp_run / "final").config.num_attention_heads == 4  # one ordinary, whole model


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_pipeline_training_equals_one_process(schedule, corpus, runs, pp_run, mp_single) -> None:
    run = pp_run if schedule == "1f1b" else runs / "mp-pp2-gpipe"
    if schedule != "1f1b":
        ok(train(corpus, run, *MP, "--pp", "2", "--pp-schedule", schedule))
    assert read_meta(complete_checkpoints(run)[-1][1])["parallel"] == {"dp": 1, "tp": 1, "pp": 2}
    assert_same_training(run, mp_single, 1e-10)


@pytest.mark.parametrize("layout", ["pp", "tp"])
def test_model_parallel_resume_is_exact(layout, corpus, runs, pp_run, tp_run) -> None:
    """Rank 1 dies after step 4; the resumed run (same layout) ends bit for bit on the
    uninterrupted one."""
    reference, args = {"pp": (pp_run, ("--pp", "2")), "tp": (tp_run, ("--tp", "2"))}[layout]
    out = runs / f"mp-{layout}2-resume"
    stopped = train(corpus, out, *MP, *args, env={"LMFLEET_FAULT_STEP": "4", "LMFLEET_FAULT_RANK": "1"})
    assert stopped.returncode != 0
    assert [s for s, _ in complete_checkpoints(out)] == [MP_CKPT]
    ok(train(corpus, out, *MP, *args, "--resume"))
    assert bit_identical(weights(out), weights(reference))
    assert train_losses(out) == train_losses(reference)


def test_checkpoints_reshard_between_tp2_and_one_process(corpus, runs, tp_run, mp_single) -> None:
    """A TP=2 checkpoint resumed by one process, and a one-process checkpoint resumed at TP=2: DCP
    reshards model and optimizer state; both end where the uninterrupted one-process run did."""
    for source, name, args, nproc in [(tp_run, "tp2-to-1", (), 1), (mp_single, "1-to-tp2", ("--tp", "2"), 2)]:
        out = runs / f"mp-{name}"
        shutil.copytree(source, out)
        shutil.rmtree(out / "final")
        shutil.rmtree(out / "checkpoints" / f"step_{MP_STEPS}")
        result = train(corpus, out, *MP, *args, "--resume", nproc=nproc)
        ok(result)
        assert f"resuming from {out / 'checkpoints' / f'step_{MP_CKPT}'}" in result.stderr
        tp = 2 if args else 1
        assert read_meta(complete_checkpoints(out)[-1][1])["parallel"] == {"dp": 1, "tp": tp, "pp": 1}
        assert_same_training(out, mp_single, 1e-10)


def node_command(corpus: Path, out: Path, *args: str) -> list[str]:
    """`lmfleet train` as one node of a multi-node run (the node count and endpoint in `args`)."""
    import sys

    return [sys.executable, "-m", "lmfleet.cli", "train", str(CONFIG), "--data", str(corpus), "--out", str(out),
            "--set", "batch.micro_batch=4", *args]


def test_dp2_x_tp2_on_two_local_nodes_equals_one_process(corpus, runs, mp_single) -> None:
    """4 processes as two 'nodes' of 2 on one rendezvous: TP inside a node, DP across (mesh dp=2,
    tp=2), one micro-batch of 4 per data-parallel rank: the same 8 sequences per step."""
    import subprocess

    from .helpers import free_port

    out = runs / "mp-dp2-tp2"
    cmd = node_command(corpus, out, *MP, "--set", "batch.grad_accum=1", "--nproc", "2", "--tp", "2",
                       "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}")
    env = {**os.environ, "LMFLEET_RDZV_ID": f"dp-tp-{os.getpid()}"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    try:
        results = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for node, (stdout, stderr) in zip(nodes, results):
        assert node.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert read_meta(complete_checkpoints(out)[-1][1])["parallel"] == {"dp": 2, "tp": 2, "pp": 1}
    assert_same_training(out, mp_single, 1e-10)


def test_resume_at_another_world_size_keeps_the_global_batch(corpus, runs, ddp64_run) -> None:
    """A 2-process checkpoint resumed by 1 process (grad_accum 2 instead of 1), and a 1-process
    checkpoint resumed by 2: both end on the uninterrupted 2-process run's weights."""
    for name, nproc, source in [("2-to-1", 1, None), ("1-to-2", 2, "1proc")]:
        out = runs / f"elastic-{name}"
        if source is None:
            shutil.copytree(ddp64_run, out)
        else:  # one process, 8 sequences per step in 2 micro-steps of 4, stopped for good at step CKPT
            stopped = train(corpus, out, *FP64, "--set", "batch.grad_accum=2", nproc=1,
                            env={"LMFLEET_SIGTERM_STEP": str(CKPT)})
            ok(stopped)
        shutil.rmtree(out / "final", ignore_errors=True)
        shutil.rmtree(out / "checkpoints" / f"step_{STEPS}", ignore_errors=True)
        resumed = train(corpus, out, *FP64, "--resume", nproc=nproc)
        ok(resumed)
        # 1 process x micro-batch 4 x grad_accum 1 would be 4 a step: said, and the checkpoint's 8 kept.
        assert ("keeping the checkpoint's global batch of 8 sequences per step" in resumed.stderr) == (nproc == 1)
        starts = records(out, "start")
        assert starts[-1]["resumed_from"] == f"step_{CKPT}" and starts[-1]["world_size"] == nproc
        assert starts[-1]["grad_accum"] == {1: 2, 2: 1}[nproc]
        assert read_meta(complete_checkpoints(out)[-1][1])["global_batch"] == 8
        assert max_diff(weights(out), weights(ddp64_run)) <= 1e-10
        assert all(abs(a - b) <= 1e-10 for a, b in zip(train_losses(out).values(), train_losses(ddp64_run).values()))


def test_loader_sees_every_sample_once_per_epoch_across_world_sizes(corpus) -> None:
    """Steps 0..k-1 on 2 ranks, then k.. on 1 rank with twice the accumulation: the windows the
    loader hands out cover each epoch exactly once, and match what one process would read."""
    from lmfleet.data.loader import TokenLoader

    c = Corpus(corpus)
    two = [TokenLoader(c, seq_len=16, micro_batch=3, grad_accum=1, rank=r, world_size=2, seed=5) for r in range(2)]
    one = TokenLoader(c, seq_len=16, micro_batch=3, grad_accum=2, seed=5)
    epoch = one.num_windows
    steps = -(-2 * epoch // one.global_batch)  # at least two epochs' worth
    switch = steps // 3
    seen = [i for step in range(switch) for loader in two for i in loader.sample_indices(step, 0)]
    seen += [i for step in range(switch, steps) for micro in range(2) for i in one.sample_indices(step, micro)]
    assert len(seen) == steps * 6 >= 2 * epoch
    for e in range(2):
        in_epoch = seen[e * epoch:(e + 1) * epoch]
        assert sorted(in_epoch) == list(range(epoch)), f"epoch {e}: repeated or skipped windows"
    reference = [i for step in range(steps) for micro in range(2) for i in one.sample_indices(step, micro)]
    assert seen == reference


def test_elastic_node_leaves_and_the_other_continues(corpus, runs, ddp64_run) -> None:
    """--nnodes 1:2 on one rendezvous, two local 'nodes' of one process each. When the second
    node dies (its agent and its worker, SIGKILL) after the step-6 checkpoint, the first node's
    group restarts at world size 1 from that checkpoint, with grad_accum 2 keeping the global
    batch of 8, and ends on the uninterrupted 2-process run's weights."""
    import signal
    import subprocess
    import time

    import psutil

    from .helpers import free_port

    out = runs / "elastic-nodes"
    cmd = node_command(corpus, out, "--steps", str(STEPS), "--checkpoint-every", str(CKPT), "--nproc", "1",
                       "--nnodes", "1:2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf",
                       "last_call_timeout=2", "--max-restarts", "3", "--set", "batch.global_batch=8",
                       "--set", "eval.every=6", *FP64)
    env = {**os.environ, "LMFLEET_RDZV_ID": f"elastic-{os.getpid()}"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)  # the first node hosts the rendezvous store
    second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / f"step_{CKPT}").exists():
            assert time.monotonic() < deadline and first.poll() is None and second.poll() is None
            time.sleep(0.1)
        node = psutil.Process(second.pid)
        for proc in [*node.children(recursive=True), node]:  # the node goes: agent and worker
            proc.send_signal(signal.SIGKILL)
        second.wait(10)
        stdout, stderr = first.communicate(timeout=240)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert first.returncode == 0, stdout[-2000:] + stderr[-3000:]
    starts = records(out, "start")
    assert [s["world_size"] for s in starts] == [2, 1]
    assert starts[-1]["resumed_from"] is not None and int(starts[-1]["resumed_from"].split("_")[1]) >= CKPT
    meta = read_meta(complete_checkpoints(out)[-1][1])
    assert (meta["step"], meta["world_size"], meta["global_batch"]) == (STEPS, 1, 8)
    assert max_diff(weights(out), weights(ddp64_run)) <= 1e-10
