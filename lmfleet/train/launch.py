"""`lmfleet train`: validate everything up front, then train in-process or through torchrun.

Multi-process and multi-node runs use `torch.distributed.run` (torchrun) from Python: its
rendezvous joins the nodes, and with `--max-restarts K` its agent restarts the whole worker group
when a worker dies; restarted workers resume from the run's latest complete checkpoint.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmfleet.data.corpus import Corpus
from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.train import checkpointing as ckpt
from lmfleet.train.config import TrainConfig

RUN_CONFIG = "train_config.json"


@dataclass
class LaunchSpec:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    max_restarts: int = 0
    resume: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def max_local_processes() -> tuple[int, str]:
    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPUs"
    return os.cpu_count() or 1, "CPU cores"


def prepare_run(config: TrainConfig, spec: LaunchSpec) -> Path:
    """Every check that can fail, before any worker starts; writes the run's resolved config."""
    from lmfleet.train.trainer import build_model_config

    if spec.nproc < 1 or spec.nnodes < 1:
        raise ConfigError(f"--nproc={spec.nproc} and --nnodes={spec.nnodes} must be >= 1")
    limit, what = max_local_processes()
    if spec.nproc > limit:
        raise ConfigError(f"--nproc={spec.nproc} is larger than this machine allows: {limit} {what} "
                          "(one worker per device)")
    if spec.nnodes > 1 and not spec.rdzv_endpoint:
        raise ConfigError(f"--nnodes={spec.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if spec.max_restarts < 0:
        raise ConfigError(f"--max-restarts={spec.max_restarts} must be >= 0")
    config.validate(spec.world_size)
    corpus = Corpus(config.data.dir)
    model_config = build_model_config(config, corpus)
    run_dir = Path(config.train.out_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if spec.resume:
        if latest is None:
            raise LmfleetError(f"--resume: {run_dir} has no complete checkpoint to resume from")
        ckpt.check_resumable(latest, spec.world_size, config.train.strategy, model_config.to_dict(),
                             config.data.seq_len, config.global_batch(spec.world_size))
    elif latest is not None:
        raise LmfleetError(f"{run_dir} already holds checkpoints (latest {latest.name}); pass --resume to "
                           "continue that run or --out to start a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / RUN_CONFIG)
    return run_dir


def torchrun_args(run_dir: Path, spec: LaunchSpec) -> list[str]:
    args = ["--nproc-per-node", str(spec.nproc), "--nnodes", str(spec.nnodes),
            "--max-restarts", str(spec.max_restarts)]
    if spec.rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
                 "--rdzv-id", os.environ.get("LMFLEET_RDZV_ID", run_dir.resolve().name or uuid.uuid4().hex)]
        if spec.node_rank is not None:
            args += ["--node-rank", str(spec.node_rank)]
    else:
        args += ["--standalone"]
    args += ["--module", "lmfleet.train.worker", str(run_dir)]
    if spec.resume:
        args.append("--resume")
    return args


def launch(config: TrainConfig, spec: LaunchSpec) -> dict[str, Any]:
    """Run a validated training job; returns the final summary (in-process runs)."""
    run_dir = prepare_run(config, spec)
    if spec.world_size == 1 and spec.max_restarts == 0:
        from lmfleet.train.trainer import run_training

        return run_training(config, run_dir, resume=spec.resume)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    try:
        run(get_args_parser().parse_args(torchrun_args(run_dir, spec)))
    except ChildFailedError as exc:
        failures = "; ".join(f"rank {rank}: exit code {f.exitcode}" for rank, f in exc.failures.items())
        raise LmfleetError(f"training workers failed ({failures}); logs above, checkpoints in "
                           f"{ckpt.checkpoint_root(run_dir)}") from None
    return run_summary(run_dir)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """What a finished run reports: final model dir and its last validation result."""
    from lmfleet.train.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    final = run_dir / "final"
    return {"run_dir": str(run_dir), "final_dir": str(final) if final.is_dir() else None,
            **(evals[-1] if evals else {})}
