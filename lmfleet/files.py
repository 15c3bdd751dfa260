"""File helpers shared by corpora, recommender datasets and checkpoints."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path


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
