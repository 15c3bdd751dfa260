"""Text sources -> tokenizer -> token shards on disk (np.memmap) + manifest.json.

A corpus directory holds the tokenizer files (so it loads with `load_tokenizer`), one or more
`<split>_<NNN>.bin` shards per split (documents back to back, each followed by EOS) and a
`manifest.json` that records sources, token counts and a SHA-256 of every shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmfleet.errors import ConfigError, DataError
from lmfleet.files import check_output_dir as check_dir
from lmfleet.files import file_sha256, publish_dir
from lmfleet.model.tokenizer import Tokenizer, load_tokenizer, train_bpe

MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# Directories of the standard library that are not representative source code
# (deliberately broken files, vendored test data).
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}


@dataclass
class Document:
    source: str  # the source it came from ("stdlib" or the path given)
    name: str  # path relative to its source, stable across machines
    text: str


@dataclass
class SourceFiles:
    label: str
    root: Path
    files: list[Path]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_sources(sources: Sequence[str]) -> list[SourceFiles]:
    """Expand `stdlib`, files and directories into sorted file lists."""
    if not sources:
        raise DataError("no source given: use --source stdlib or --source PATH")
    resolved = []
    for src in sources:
        if src == "stdlib":
            root = stdlib_root()
            files = [p for p in root.rglob("*.py")
                     if not STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1])]
        else:
            path = Path(src)
            if not path.exists():
                raise DataError(f"source {src!r} does not exist (give 'stdlib', a text file or a directory)")
            if path.is_file():
                root, files = path.parent, [path]
            else:
                root = path
                files = [p for p in path.rglob("*") if p.is_file()
                         and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        files.sort(key=lambda p: p.relative_to(root).as_posix())
        if not files:
            raise DataError(f"source {src!r} holds no files")
        resolved.append(SourceFiles(src, root, files))
    return resolved


def read_documents(sources: list[SourceFiles], skipped: list[str] | None = None) -> Iterator[Document]:
    """UTF-8 text of every file; binary or non-UTF-8 files are skipped (and listed in `skipped`)."""
    for src in sources:
        for path in src.files:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is None or "\x00" in text:
                if skipped is not None:
                    skipped.append(str(path))
                continue
            if text.strip():
                yield Document(src.label, path.relative_to(src.root).as_posix(), text)


def split_of(doc: Document, val_fraction: float) -> str:
    """Deterministic per-document split from a hash of its path relative to its source, so the
    split is the same on every machine and stays stable when sources grow."""
    digest = hashlib.sha256(doc.name.encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def _batched(items: Iterator[Document], n: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to `<split>_<NNN>.bin`, starting a new shard past `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = (self.directory / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        if self._file is None or self._count >= self.shard_tokens:
            self.close()
            self._open()
        self._file.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._count += len(tokens)
        self.shards[-1]["tokens"] = self._count
        self.documents += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict[str, Any]:
        self.close()
        for shard in self.shards:
            shard["sha256"] = file_sha256(self.directory / shard["file"])
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def _carve_val(train: _ShardWriter, val: _ShardWriter, val_fraction: float) -> None:
    """When no document hashed into val (a corpus of a few files), move the tail of train there."""
    train.close()
    if not train.shards:
        return
    last = train.shards[-1]
    path = train.directory / last["file"]
    tokens = np.fromfile(path, dtype=train.dtype)
    total = sum(s["tokens"] for s in train.shards)
    n_val = min(max(1, int(total * val_fraction)), len(tokens) // 2)
    if n_val == 0:
        return
    tokens[:-n_val].tofile(path)
    last["tokens"] = len(tokens) - n_val
    val.write(tokens[-n_val:])


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a directory holding anything but a corpus, or a corpus
    without `overwrite`."""
    check_dir(out, overwrite, f"corpus ({MANIFEST})", lambda d: (d / MANIFEST).is_file())


def prepare_corpus(sources: Sequence[str], out: str | os.PathLike, vocab_size: int = 8192,
                   val_fraction: float = 0.01, shard_tokens: int = 50_000_000,
                   tokenizer: str | os.PathLike | None = None,
                   progress: Callable[[str, int, int], None] | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Build a corpus directory; returns its manifest. Deterministic for the same sources.

    `tokenizer`: a directory whose tokenizer to reuse instead of training a new one.
    `progress(stage, done, total)` is called as files are tokenized.
    `out` must be new or empty; a previous corpus there is replaced only with `overwrite`, and a
    directory holding anything else is never touched.
    """
    check_output_dir(Path(out), overwrite)
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens <= 0:
        raise ConfigError(f"shard_tokens={shard_tokens} must be positive")
    start = time.perf_counter()
    resolved = resolve_sources(sources)
    n_files = sum(len(s.files) for s in resolved)
    skipped: list[str] = []
    if next(read_documents(resolved), None) is None:
        raise DataError(f"sources {list(sources)} hold no UTF-8 text")
    # Two streaming passes over the files (train the tokenizer, then encode) keep memory flat.
    if tokenizer is None:
        tok = train_bpe((d.text for d in read_documents(resolved)), vocab_size=vocab_size, length=n_files)
    else:
        tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    dtype = token_dtype(tok.vocab_size)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        done = 0
        for chunk in _batched(read_documents(resolved, skipped), 64):
            for doc, ids in zip(chunk, tok.encode_batch([d.text for d in chunk], add_special_tokens=False)):
                writers[split_of(doc, val_fraction)].write(np.asarray(ids + [tok.eos_id], dtype=np.int64))
            done += len(chunk)
            if progress is not None:
                progress("tokenize", done, n_files)
        if val_fraction > 0 and writers["val"].documents == 0:
            _carve_val(writers["train"], writers["val"], val_fraction)
        tok.save(tmp)
        manifest = {
            "format": "lmfleet-corpus/1",
            "tokenizer": "tokenizer.json",
            "vocab_size": tok.vocab_size,
            "dtype": dtype.name,
            "eos_id": tok.eos_id,
            "val_fraction": val_fraction,
            "sources": [{"source": s.label, "files": len(s.files),
                         "bytes": sum(p.stat().st_size for p in s.files)} for s in resolved],
            "files_read": n_files - len(skipped),
            "files_skipped": len(skipped),
            "splits": {s: w.summary() for s, w in writers.items()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        check_output_dir(out, overwrite)  # again: it may have changed while we tokenized
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["seconds"] = round(time.perf_counter() - start, 2)
    return manifest


class Corpus:
    """A prepared corpus directory: its manifest, tokenizer and memory-mapped token shards."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.path} is not a corpus directory (no {MANIFEST}); "
                            "make one with `lmfleet data prepare`")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            self.dtype = np.dtype(self.manifest["dtype"])
            self.splits = self.manifest["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{manifest_path} is malformed: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.path)

    def shards(self, split: str = "train") -> list[np.memmap]:
        """Read-only memory maps of a split's shards, in order."""
        if split not in self.splits:
            raise DataError(f"corpus {self.path} has no split {split!r}; it has {sorted(self.splits)}")
        maps = []
        for shard in self.splits[split]["shards"]:
            path = self.path / shard["file"]
            if not path.is_file():
                raise DataError(f"corpus shard {path} is missing")
            mm = np.memmap(path, dtype=self.dtype, mode="r")
            if len(mm) != shard["tokens"]:
                raise DataError(f"corpus shard {path} holds {len(mm)} tokens, manifest says {shard['tokens']}")
            maps.append(mm)
        return maps

    def tokens(self, split: str = "train") -> np.ndarray:
        """All tokens of a split as one array (copies; use `shards` for large corpora)."""
        maps = self.shards(split)
        return np.concatenate(maps) if maps else np.zeros(0, dtype=self.dtype)

    def identity(self) -> dict[str, str]:
        """The corpus's path and a SHA-256 over its tokenizer file and every shard's recorded
        checksum: equal for two preparations of the same text, different for any other data."""
        h = hashlib.sha256()
        h.update(file_sha256(self.path / self.manifest.get("tokenizer", "tokenizer.json")).encode())
        for split in sorted(self.splits):
            for shard in self.splits[split]["shards"]:
                h.update(f"{split}/{shard['file']}:{shard['tokens']}:{shard['sha256']}\n".encode())
        return {"path": str(self.path.resolve()), "sha256": h.hexdigest()}

    def verify(self) -> None:
        """Check every shard against the SHA-256 in the manifest."""
        for split in self.splits.values():
            for shard in split["shards"]:
                if file_sha256(self.path / shard["file"]) != shard["sha256"]:
                    raise DataError(f"corpus shard {self.path / shard['file']} does not match its checksum")
