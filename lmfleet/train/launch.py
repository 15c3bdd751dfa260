"""`lmfleet train`: validate everything up front, then train in-process or through torchrun.

Multi-process and multi-node runs use `torch.distributed.run` (torchrun) from Python: its
rendezvous joins the nodes, and with `--max-restarts K` its agent restarts the whole worker group
when a worker dies; restarted workers resume from the run's latest complete checkpoint.

SIGTERM to this process reaches the workers through torchrun's agent, which passes it on to every
worker and waits up to SIGTERM_GRACE_S for them; the workers finish their step, checkpoint it and
exit, and this process then reports the stop and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmfleet.data.corpus import Corpus
from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.parallel.mesh import ParallelDims
from lmfleet.parallel.parallelize import check_micro_batches, check_parallel
from lmfleet.train import checkpointing as ckpt
from lmfleet.train.config import TrainConfig

RUN_CONFIG = "train_config.json"
SIGTERM_GRACE_S = 120  # how long torchrun's agent waits for workers to checkpoint after SIGTERM


@dataclass
class LaunchSpec:
    nproc: int = 1
    nnodes: int = 1  # with max_nnodes: the fewest nodes the run goes on with (elastic)
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    max_nnodes: int | None = None  # elastic: nodes may join up to this many, and leave down to nnodes
    rdzv_conf: str | None = None  # torchrun's --rdzv-conf, e.g. last_call_timeout=10
    max_restarts: int = 0
    resume: bool = False
    allow_new_data: bool = False  # resume on a corpus other than the checkpoint's
    checkpoint_on_sigterm: bool = True

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @property
    def elastic(self) -> bool:
        return self.max_nnodes is not None and self.max_nnodes != self.nnodes

    @property
    def world_sizes(self) -> list[int]:
        """Every world size the run may have: one, or one per node count from MIN to MAX."""
        return [self.nproc * n for n in range(self.nnodes, (self.max_nnodes or self.nnodes) + 1)]

    @property
    def nnodes_arg(self) -> str:
        return f"{self.nnodes}:{self.max_nnodes}" if self.elastic else str(self.nnodes)


def parse_nnodes(value: str) -> tuple[int, int | None]:
    """`N` or `MIN:MAX` (torchrun's form) -> (min, max or None)."""
    low, sep, high = value.partition(":")
    try:
        nodes = (int(low), int(high) if sep else None)
    except ValueError:
        raise ConfigError(f"--nnodes={value!r}: give a node count N or a range MIN:MAX, e.g. 1:4") from None
    if nodes[0] < 1 or (nodes[1] is not None and nodes[1] < nodes[0]):
        raise ConfigError(f"--nnodes={value!r}: need 1 <= MIN <= MAX")
    return nodes


def max_local_processes() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


class TrainTask:
    """What the launcher needs to know of a kind of model: a language model here;
    `lmfleet.recsys.train` has the recommender's."""

    worker = "lmfleet.train.worker"  # the module torchrun starts in every worker process

    def inspect(self, config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """The model's configuration and the data's identity (what a resumed run must match),
        after every check of them that can fail."""
        from lmfleet.train.trainer import build_model_config

        corpus = Corpus(config.data.dir)
        self.corpus, self.model_config = corpus, build_model_config(config, corpus)
        return self.model_config.to_dict(), corpus.identity()

    def check_dims(self, dims: ParallelDims) -> None:
        check_parallel(self.model_config, dims)

    def run(self, config: TrainConfig, run_dir: Path, resume_from: Path | None,
            checkpoint_on_sigterm: bool) -> dict[str, Any]:
        """Train in this process (one worker, no torchrun)."""
        from lmfleet.train.trainer import run_training

        return run_training(config, run_dir, resume_from=resume_from, checkpoint_on_sigterm=checkpoint_on_sigterm)


def prepare_run(config: TrainConfig, spec: LaunchSpec, task: TrainTask | None = None) -> tuple[Path, Path | None]:
    """Every check that can fail, before any worker starts; writes the run's resolved config.
    Returns the run directory and, with --resume, the checkpoint to resume from."""
    task = task or TrainTask()
    if spec.nproc < 1 or spec.nnodes < 1:
        raise ConfigError(f"--nproc={spec.nproc} and --nnodes={spec.nnodes} must be >= 1")
    limit, what = max_local_processes()
    if spec.nproc > limit:
        raise ConfigError(f"--nproc={spec.nproc} is larger than this machine allows: {limit} {what} "
                          "(one worker per device)")
    if (spec.max_nnodes or spec.nnodes) > 1 and not spec.rdzv_endpoint:
        raise ConfigError(f"--nnodes={spec.nnodes_arg} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if spec.max_restarts < 0:
        raise ConfigError(f"--max-restarts={spec.max_restarts} must be >= 0")
    if spec.elastic and config.train.strategy == "diloco":
        raise ConfigError(f"--nnodes={spec.nnodes_arg} with strategy 'diloco': a DiLoCo run cannot change its world "
                          "size (each rank's replica is its own); give a fixed --nnodes")
    if spec.elastic and config.batch.global_batch is None:
        raise ConfigError(f"--nnodes={spec.nnodes_arg}: an elastic run needs batch.global_batch, the sequences per "
                          "step kept whatever the number of nodes (gradient accumulation adjusts)")
    config.validate(spec.world_size)
    model_config, data_identity = task.inspect(config)
    teacher = None
    if config.distill.teacher:
        from lmfleet.compress.distill import check_teacher, teacher_identity

        check_teacher(config.distill.teacher, model_config["vocab_size"], task.corpus, config.data.seq_len)
        teacher = teacher_identity(config.distill.teacher)
    run_dir = Path(config.train.out_dir)
    if spec.resume:
        ckpt.remove_stale(run_dir)  # before the pick: a complete save whose rename never happened counts
        selection = ckpt.select_checkpoint(run_dir, verify_hashes=True)
        if selection.path is None:
            raise LmfleetError(f"--resume: {run_dir} has no complete checkpoint to resume from"
                               + "".join(f"; skipped {p.name}: {why}" for p, why in selection.skipped))
        meta = ckpt.check_resumable(selection.path, spec.world_size, config.train.strategy,
                                    model_config, config.data.seq_len, config.batch.global_batch)
        if not spec.allow_new_data:
            ckpt.check_same_corpus(selection.path, meta, data_identity)
        ckpt.check_same_teacher(selection.path, meta, teacher,
                                {"temperature": config.distill.temperature, "alpha": config.distill.alpha})
        # The checkpoint's global batch, whatever this run's world size: the loss curve continues.
        saved_batch = meta.get("global_batch")
        if not isinstance(saved_batch, int) or isinstance(saved_batch, bool) or saved_batch < 1:
            raise LmfleetError(f"cannot resume from {selection.path}: its meta.json has global_batch="
                               f"{saved_batch!r}, not a positive integer")
        asked = config.global_batch(config.dp_degree(spec.world_size))
        config.batch.global_batch = saved_batch
        print(selection.describe(), file=sys.stderr, flush=True)
        if asked != saved_batch:
            print(f"keeping the checkpoint's global batch of {saved_batch} sequences per step (this run's "
                  f"micro_batch x grad_accum x data-parallel ranks would make {asked}); grad_accum is derived "
                  "from it", file=sys.stderr, flush=True)
    else:
        held = sorted(ckpt.step_dirs(run_dir) + ckpt.unrenamed_saves(run_dir))  # nothing is deleted here
        if held:
            latest, (_, last) = ckpt.latest_checkpoint(run_dir), held[-1]
            why = ckpt.problem(last)
            newest = f"latest complete {latest.name}" if latest else \
                f"none complete; {last.name}: {why}" if why else f"{last.name}: complete, not yet renamed into place"
            raise LmfleetError(f"{run_dir} already holds checkpoints ({newest}); pass --resume to continue that "
                               "run or --out to start a new one")
        config.batch.global_batch = config.global_batch(config.dp_degree(spec.world_size))
    for world in spec.world_sizes:  # workers re-derive grad_accum at the world size they find
        dims = ParallelDims.for_world(world, config.parallel.tp, config.parallel.pp)
        task.check_dims(dims)
        check_micro_batches(dims, config.derive_grad_accum(dims.dp), config.parallel.pp_schedule)
    config.derive_grad_accum(config.dp_degree(spec.world_size))
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / RUN_CONFIG)
    return run_dir, selection.path if spec.resume else None


def torchrun_args(run_dir: Path, spec: LaunchSpec, resume_from: Path | None = None,
                  shutdown_timeout: bool = True, worker: str = TrainTask.worker) -> list[str]:
    args = ["--nproc-per-node", str(spec.nproc), "--nnodes", spec.nnodes_arg,
            "--max-restarts", str(spec.max_restarts)]
    if shutdown_timeout:  # torch >= 2.7; older agents wait their default 30 s
        args += ["--shutdown-timeout", str(SIGTERM_GRACE_S)]
    if spec.rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
                 "--rdzv-id", os.environ.get("LMFLEET_RDZV_ID", run_dir.resolve().name or uuid.uuid4().hex)]
        if spec.node_rank is not None:
            args += ["--node-rank", str(spec.node_rank)]
        if spec.rdzv_conf:
            args += ["--rdzv-conf", spec.rdzv_conf]
    else:
        args += ["--standalone"]
    args += ["--module", worker, str(run_dir)]
    if resume_from is not None:
        args += ["--resume-from", str(resume_from)]
    if not spec.checkpoint_on_sigterm:
        args.append("--no-checkpoint-on-sigterm")
    return args


def launch(config: TrainConfig, spec: LaunchSpec, task: TrainTask | None = None) -> dict[str, Any]:
    """Run a validated training job; returns its summary: the final model, or where SIGTERM
    stopped it (`stopped_at`, `checkpoint`)."""
    task = task or TrainTask()
    run_dir, resume_from = prepare_run(config, spec, task)
    start_step = ckpt.read_meta(resume_from)["step"] if resume_from else 0
    if spec.world_size == 1 and spec.max_restarts == 0 and not spec.elastic:
        return {"run_dir": str(run_dir), **task.run(config, run_dir, resume_from, spec.checkpoint_on_sigterm)}
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    parser = get_args_parser()
    has_timeout = any("--shutdown-timeout" in action.option_strings for action in parser._actions)
    try:
        run(parser.parse_args(torchrun_args(run_dir, spec, resume_from, shutdown_timeout=has_timeout,
                                            worker=task.worker)))
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {rank}: exit code {f.exitcode}" for rank, f in exc.failures.items())
        raise LmfleetError(f"training workers failed ({failures}); logs above, checkpoints in "
                           f"{ckpt.checkpoint_root(run_dir)}") from None
    except SignalException as exc:
        return after_signal(run_dir, exc.sigval, start_step, config, spec)
    # Another node's SIGTERM stops every node's workers at the same step.
    return stop_summary(run_dir, start_step) or run_summary(run_dir)


def stop_summary(run_dir: Path, start_step: int) -> dict[str, Any] | None:
    """The summary of a run that SIGTERM stopped after `start_step`, or None."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        return None
    meta = ckpt.read_meta(latest)
    if meta.get("stopped_by") and meta["step"] > start_step:
        return {"run_dir": str(run_dir), "final_dir": None, "stopped_at": meta["step"], "checkpoint": str(latest)}
    return None


def after_signal(run_dir: Path, sig: signal.Signals, start_step: int, config: TrainConfig,
                 spec: LaunchSpec) -> dict[str, Any]:
    """torchrun's agent passed a signal to the workers and waited for them: what they left."""
    if sig == signal.SIGINT:
        raise KeyboardInterrupt
    latest = ckpt.latest_checkpoint(run_dir)
    saved = f"the latest complete checkpoint is {latest}" if latest else "there is no complete checkpoint"
    if sig != signal.SIGTERM or not spec.checkpoint_on_sigterm:
        raise LmfleetError(f"stopped by {sig.name} without a checkpoint on the way out; {saved}")
    stopped = stop_summary(run_dir, start_step)
    if stopped is not None:
        return stopped
    if latest is not None and ckpt.read_meta(latest)["step"] == config.train.steps > start_step:
        return run_summary(run_dir)  # it had finished when the signal came
    raise LmfleetError(f"stopped by SIGTERM before the workers could checkpoint; {saved}")


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What a finished run reports: final model dir and its last validation result."""
    from lmfleet.train.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    final = run_dir / "final"
    return {"run_dir": str(run_dir), "final_dir": str(final) if final.is_dir() else None,
            **(evals[-1] if evals else {})}
