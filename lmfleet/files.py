"""File helpers shared by corpora, recommender datasets and checkpoints."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from lmfleet.errors import ConfigError


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished directory `tmp` to `out` (a sibling): an old `out` moves aside first and goes
    only once the new one is in place, so `out` is never half-written."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def check_output_dir(out: Path, overwrite: bool, kind: str, holds_one: Callable[[Path], bool]) -> None:
    """Refuse an output that is a file, a non-empty directory that `holds_one` says is not a `kind`,
    or a `kind` without `overwrite` (nothing is deleted that a user did not ask to replace)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory")
    if not any(out.iterdir()):
        return
    if not holds_one(out):
        raise ConfigError(f"--out {out} is not empty and holds no {kind}: choose a new or empty directory; "
                          "nothing was changed")
    if not overwrite:
        raise ConfigError(f"--out {out} already holds a {kind}: pass --overwrite to replace it")
