"""Stateful training checkpoints: atomic, complete or absent, last K kept.

`RUN/checkpoints/step_<N>/` holds
  meta.json        step, world size, strategy, model config, batch shape (written last, by rank 0)
  sharded/         torch.distributed.checkpoint of model + optimizer (ddp, fsdp)
  rank_<r>.pt      per-rank state: loader, RNG, and strategy state such as DiLoCo's (tensors and
                   plain containers only; read back with torch.load(weights_only=True))

Every rank writes into `.step_<N>.tmp/`; after a barrier rank 0 writes meta.json and renames the
directory into place, so a crash mid-save leaves the previous checkpoint untouched and the
half-written one invisible.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmfleet.errors import LmfleetError

STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = STEP_DIR.match(path.name)
            if match and (path / META).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def read_meta(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmfleetError(f"checkpoint {path} has an unreadable {META}: {exc}") from None


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(run_dir: str | Path, step: int, rank: int, sharded: dict[str, Any] | None,
                    local: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it with its own `local` state."""
    import torch.distributed.checkpoint as dcp

    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "sharded").mkdir(parents=True)
    _barrier()
    if sharded is not None:
        dcp.save(sharded, checkpoint_id=str(tmp / "sharded"))
    torch.save(local, tmp / f"rank_{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, rank: int, sharded: dict[str, Any] | None) -> dict[str, Any]:
    """Fill `sharded` in place from the checkpoint and return this rank's local state."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if sharded is not None:
        dcp.load(sharded, checkpoint_id=str(path / "sharded"))
    local_path = path / f"rank_{rank}.pt"
    if not local_path.is_file():
        raise LmfleetError(f"checkpoint {path} has no state for rank {rank}; it was written by a different "
                           "number of processes")
    return torch.load(local_path, weights_only=True, map_location="cpu")


def check_resumable(path: str | Path, world_size: int, strategy: str, model_config: dict[str, Any],
                    seq_len: int, global_batch: int) -> dict[str, Any]:
    """Refuse, before any worker starts, a resume the checkpoint cannot serve."""
    meta = read_meta(path)
    problems = []
    if meta.get("world_size") != world_size:
        problems.append(f"it was written by {meta.get('world_size')} processes, this run has {world_size}")
    if meta.get("strategy") != strategy:
        problems.append(f"it used strategy {meta.get('strategy')!r}, this run uses {strategy!r}")
    saved = meta.get("model_config", {})
    diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if diff:
        problems.append("its model differs in " + ", ".join(f"{k} ({saved.get(k)} vs {model_config.get(k)})"
                                                            for k in diff))
    if meta.get("seq_len") != seq_len or meta.get("global_batch") != global_batch:
        problems.append(f"its batch was {meta.get('global_batch')} x {meta.get('seq_len')} tokens, this run's is "
                        f"{global_batch} x {seq_len}")
    if problems:
        raise LmfleetError(f"cannot resume from {path}: " + "; ".join(problems))
    return meta
