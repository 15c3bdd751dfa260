"""Stateful training checkpoints: complete or ignored, never half-replaced, last K kept.

`RUN/checkpoints/step_<N>/` holds
  sharded/         torch.distributed.checkpoint of model + optimizer (ddp, fsdp)
  rank_<r>.pt      per-rank state: loader, RNG, and strategy state such as DiLoCo's (tensors and
                   plain containers only; read back with torch.load(weights_only=True))
  meta.json        step, world size, strategy, model config, batch shape, corpus identity
  manifest.json    every other file's size and SHA-256, written last: the completeness marker

A save goes to `.step_<N>.tmp/`: every rank writes and fsyncs its files, the ranks fsync and hash
the files between them, then rank 0 writes meta.json and manifest.json, fsyncs the directory and
renames it to `step_<N>`. A directory already called `step_<N>` (an incomplete one a resumed run is
overwriting) is first moved aside to `.step_<N>.old` and deleted only after the rename, so at every
instant the checkpoints a run can resume from are on disk in full. When the next attempt starts,
a complete `.step_<N>.tmp` left between those two renames is put in place and any other
temporary is deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmfleet.errors import LmfleetError
from lmfleet.files import file_sha256

STEP_DIR = re.compile(r"^step_(\d+)$")
STALE_DIR = re.compile(r"^\.step_(\d+)\.(tmp|old)$")
META = "meta.json"
MANIFEST = "manifest.json"
# 2: optimizer state keyed by parameter name (any TP/PP/DP layout reads it back).
FORMAT = "lmfleet-checkpoint/2"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _entries(run_dir: str | Path, pattern: re.Pattern[str]) -> list[tuple[re.Match[str], Path]]:
    """The directories under checkpoints/ whose names match `pattern`, by name."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return [(match, path) for path in sorted(root.iterdir())
            if (match := pattern.match(path.name)) is not None and path.is_dir()]


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_<N>` directory, complete or not, oldest first."""
    return sorted((int(match.group(1)), path) for match, path in _entries(run_dir, STEP_DIR))


def problem(path: str | Path, verify_hashes: bool = False) -> str | None:
    """Why checkpoint `path` cannot be resumed from (None: it is complete). Sizes are always
    checked against the manifest; SHA-256s too with `verify_hashes`."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (its save did not finish, or it predates checkpoint manifests)"
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"unreadable {MANIFEST}: {exc}"
    if manifest.get("format") != FORMAT:
        return f"written in format {manifest.get('format')!r}; this lmfleet reads {FORMAT!r}"
    for name, entry in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != entry["bytes"]:
            return f"{name} holds {size} bytes, the manifest says {entry['bytes']}"
        if verify_hashes and file_sha256(file) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (sizes checked), oldest first."""
    return [(step, path) for step, path in step_dirs(run_dir) if problem(path) is None]


@dataclass
class Selection:
    """The checkpoint a resume starts from and the newer ones it passed over, with the reason."""

    path: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        picked = f"resuming from {self.path}" if self.path else "no complete checkpoint to resume from"
        passed = "; ".join(f"skipped {p.name}: {why}" for p, why in self.skipped)
        return picked + (f" ({passed})" if passed else "")


def select_checkpoint(run_dir: str | Path, verify_hashes: bool = False) -> Selection:
    """The newest complete checkpoint, and every newer incomplete one skipped on the way."""
    skipped = []
    for _, path in reversed(step_dirs(run_dir)):
        why = problem(path, verify_hashes)
        if why is None:
            return Selection(path, skipped)
        skipped.append((path, why))
    return Selection(None, skipped)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return select_checkpoint(run_dir).path


def read_meta(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmfleetError(f"checkpoint {path} has an unreadable {META}: {exc}") from None


def unrenamed_saves(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of each complete `.step_<N>.tmp` whose rename into place never happened."""
    return sorted((int(match.group(1)), path) for match, path in _entries(run_dir, STALE_DIR)
                  if match.group(2) == "tmp" and problem(path) is None)


def remove_stale(run_dir: str | Path) -> list[Path]:
    """Clear up after saves that crashed: a complete `.step_<N>.tmp` whose rename did not happen
    becomes `step_<N>`; other temporaries (`.step_<N>.tmp`, `.step_<N>.old`) are deleted. Returns
    what was deleted. Only call it while no save runs (at the start of an attempt, on one rank)."""
    root = checkpoint_root(run_dir)
    removed = []
    for match, path in _entries(run_dir, STALE_DIR):
        final = root / f"step_{match.group(1)}"
        if match.group(2) == "tmp" and not final.exists() and problem(path) is None:
            try:  # the crash came between moving the old one aside and this rename
                path.rename(final)
            except FileNotFoundError:  # another node's launcher, on a shared file system, was first
                continue
            _fsync_dir(root)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_and_hash(tmp: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """fsync and hash every file in `tmp`, the ranks taking turns; every rank gets all entries."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    mine = {}
    for name in names[rank::world_size]:
        file = tmp / name
        with file.open("rb") as f:
            os.fsync(f.fileno())
        mine[name] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    if world_size == 1:
        return mine
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return {name: entry for part in gathered for name, entry in part.items()}


def save_checkpoint(run_dir: str | Path, step: int, rank: int, sharded: dict[str, Any] | None,
                    local: dict[str, Any], meta: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it with its own `local` state."""
    import torch.distributed.checkpoint as dcp

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    root = checkpoint_root(run_dir)
    final = root / f"step_{step}"
    tmp = root / f".step_{step}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "sharded").mkdir(parents=True)
    _barrier()
    if sharded is not None:
        dcp.save(sharded, checkpoint_id=str(tmp / "sharded"))
    with (tmp / f"rank_{rank}.pt").open("wb") as f:
        torch.save(local, f)
        f.flush()
        os.fsync(f.fileno())
    _barrier()
    files = _sync_and_hash(tmp, rank, world_size)
    if rank == 0:
        meta_bytes = (json.dumps({**meta, "step": step}, indent=2) + "\n").encode()
        _write_durably(tmp / META, meta_bytes)
        files[META] = {"bytes": len(meta_bytes), "sha256": hashlib.sha256(meta_bytes).hexdigest()}
        manifest = {"format": FORMAT, "step": step, "files": dict(sorted(files.items()))}
        _write_durably(tmp / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _fsync_dir(tmp / "sharded")
        _fsync_dir(tmp)
        old = root / f".step_{step}.old"
        if final.exists():  # an incomplete step_<N> from an earlier attempt: aside, not deleted, until replaced
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _prune(run_dir, step, keep_last)
    _barrier()
    return final


def _prune(run_dir: str | Path, newest: int, keep_last: int) -> None:
    """Keep the last `keep_last` complete checkpoints; drop damaged ones older than `newest`. A
    directory without a manifest is never deleted: a save of this format always has one, so it was
    written by something else (an older lmfleet) and is not this function's to judge."""
    complete = complete_checkpoints(run_dir)
    keep = {path for _, path in complete[-keep_last:]}
    for step, path in step_dirs(run_dir):
        if path not in keep and step < newest and (path / MANIFEST).exists():
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: str | Path, rank: int, sharded: dict[str, Any] | None,
                    same_world: bool = False) -> dict[str, Any]:
    """Fill `sharded` in place from the checkpoint (DCP reshards it to this run's layout) and
    return this rank's local state. A run on another world size has ranks the checkpoint did not:
    they take rank 0's, which holds what every rank's does (the loader's global step, counters),
    unless `same_world` (per-rank state that cannot be shared, such as DiLoCo's replicas)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    why = problem(path)
    if why is not None:
        raise LmfleetError(f"checkpoint {path} is incomplete: {why}")
    local_path = path / f"rank_{rank}.pt"
    if not local_path.is_file() and not same_world:
        local_path = path / "rank_0.pt"
    if not local_path.is_file():
        raise LmfleetError(f"checkpoint {path} has no rank_{rank}.pt: it was written by "
                           f"{read_meta(path).get('world_size')} processes")
    if sharded is not None:
        dcp.load(sharded, checkpoint_id=str(path / "sharded"))
    return torch.load(local_path, weights_only=True, map_location="cpu")


def check_resumable(path: str | Path, world_size: int, strategy: str, model_config: dict[str, Any],
                    seq_len: int, global_batch: int | None) -> dict[str, Any]:
    """Refuse, before any worker starts, a resume the checkpoint cannot serve. Another world size
    or another tp/pp layout is fine (DCP reshards model and optimizer, the loader re-splits the
    same global batch) except for DiLoCo, whose replicas are per rank. `global_batch` None: the
    run takes the checkpoint's."""
    meta = read_meta(path)
    problems = []
    if strategy == "diloco" and meta.get("world_size") != world_size:
        problems.append(f"it was written by {meta.get('world_size')} processes, this run has {world_size} "
                        "(a DiLoCo run resumes only at its own world size: each rank's replica is its own)")
    if meta.get("strategy") != strategy:
        problems.append(f"it used strategy {meta.get('strategy')!r}, this run uses {strategy!r}")
    saved = meta.get("model_config", {})
    diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if diff:
        problems.append("its model differs in " + ", ".join(f"{k} ({saved.get(k)} vs {model_config.get(k)})"
                                                            for k in diff))
    if meta.get("seq_len") != seq_len or global_batch not in (None, meta.get("global_batch")):
        problems.append(f"its batch was {meta.get('global_batch')} x {meta.get('seq_len')} tokens, this run's is "
                        f"{global_batch} x {seq_len}")
    if problems:
        raise LmfleetError(f"cannot resume from {path}: " + "; ".join(problems))
    return meta


def check_same_corpus(path: str | Path, meta: dict[str, Any], corpus: dict[str, str]) -> None:
    """Refuse to resume on a corpus other than the one the checkpoint was trained on."""
    saved = meta.get("corpus")
    if saved is None:
        raise LmfleetError(f"cannot resume from {path}: it records no corpus identity, so --data "
                           f"{corpus['path']} cannot be checked against it; pass --allow-new-data to "
                           "continue on it anyway")
    if saved.get("sha256") != corpus["sha256"]:
        raise LmfleetError(f"cannot resume from {path}: it was trained on corpus {saved.get('path')} "
                           f"(sha256 {str(saved.get('sha256'))[:12]}), and --data {corpus['path']} is another "
                           f"corpus (sha256 {corpus['sha256'][:12]}); pass --allow-new-data to continue "
                           "on the new data")


def check_same_teacher(path: str | Path, meta: dict[str, Any], teacher: dict[str, str] | None,
                       settings: dict[str, float] | None = None) -> None:
    """Refuse to resume a distillation run with another teacher or other loss `settings`
    (temperature, alpha), or to mix distillation and ordinary training in one run."""
    saved = meta.get("teacher")
    if saved is None and teacher is None:
        return
    if saved is None or teacher is None:
        what = f"distilled from {saved.get('path')}" if saved else "trained without a teacher"
        raise LmfleetError(f"cannot resume from {path}: it was {what}, and this run "
                           + (f"distils from {teacher['path']}" if teacher else "has no teacher")
                           + "; keep [distill] teacher as the run began")
    if saved.get("sha256") != teacher["sha256"]:
        raise LmfleetError(f"cannot resume from {path}: it was distilled from {saved.get('path')} (sha256 "
                           f"{str(saved.get('sha256'))[:12]}), and this run's teacher {teacher['path']} is another "
                           f"model (sha256 {teacher['sha256'][:12]})")
    saved_settings = meta.get("distill")
    if settings is not None and isinstance(saved_settings, dict) and saved_settings != settings:
        raise LmfleetError(f"cannot resume from {path}: it was distilled with {saved_settings}, this run asks for "
                           f"{settings}; keep [distill] temperature and alpha as the run began")
