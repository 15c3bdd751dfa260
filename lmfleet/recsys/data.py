"""Interaction logs -> per-user item sequences with a leave-one-out split, on disk.

`prepare_interactions` reads (user, item, timestamp) rows (MovieLens `u.data` / `ratings.dat`,
RecBole `.inter`, or CSV), orders each user's rows by time (file order breaks ties), maps item
ids to 1..N (0 is padding) and user ids to 0..U-1, and writes a dataset directory:

    items.npy      int32 [interactions]  every user's items in time order, users one after another
    offsets.npy    int64 [users + 1]     user u's items are items[offsets[u]:offsets[u + 1]]
    item_ids.json  the original id of item 1..N (list index i is item i + 1)
    user_ids.json  the original id of user 0..U-1
    manifest.json  counts, the source and its SHA-256, the split rule

Split (as in SASRec): a user's last item is the test target, the second-last the validation
target, the rest the training sequence; users with fewer than 3 interactions only train.
`synthetic_interactions` makes logs with popularity skew and a planted sequential rule.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmfleet.data.loader import epoch_order
from lmfleet.errors import ConfigError, DataError
from lmfleet.files import check_output_dir, file_sha256, publish_dir

FORMAT = "lmfleet-recsys/1"
MANIFEST = "manifest.json"
FORMATS = ("auto", "movielens", "recbole", "csv")
MAX_SEQUENCE = 1 << 20  # interactions of one user kept at most (the newest)
MAX_ITEMS = 100_000_000  # the model's catalog limit
MAX_ROWS = 200_000_000  # interactions one log may hold


@dataclass
class Interactions:
    users: list[str]
    items: list[str]
    timestamps: np.ndarray  # float64, one per row


def _detect(path: Path) -> str:
    if path.suffix == ".inter":
        return "recbole"
    if path.suffix == ".csv":
        return "csv"
    if path.name in ("u.data", "ratings.dat") or path.suffix in (".data", ".dat"):
        return "movielens"
    raise ConfigError(f"cannot tell the format of {path.name}: pass --format movielens|recbole|csv")


def _timestamp(value: str, path: Path, line: int) -> float:
    try:
        ts = float(value)
    except ValueError:
        raise DataError(f"{path}:{line}: timestamp {value!r} is not a number") from None
    if not np.isfinite(ts):
        raise DataError(f"{path}:{line}: timestamp {value!r} is not finite")
    return ts


def read_interactions(path: str | Path, fmt: str = "auto") -> Interactions:
    """(user, item, timestamp) rows of an interaction log; the error names the line of a bad row."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {list(FORMATS)}")
    if not path.is_file():
        raise DataError(f"interaction file {path} does not exist")
    fmt = _detect(path) if fmt == "auto" else fmt
    try:
        return _read_rows(path, fmt)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start} of a line: {exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: unreadable CSV ({exc})") from None


def _read_rows(path: Path, fmt: str) -> Interactions:
    users, items, stamps = [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        first = f.readline()
        if fmt == "movielens":
            sep = "::" if "::" in first else "\t"
            rows = (line.rstrip("\r\n").split(sep) for line in itertools.chain([first], f))
            columns, start = (0, 1, 3), 1
        elif fmt == "recbole":
            names = [h.split(":", 1)[0] for h in first.rstrip("\r\n").split("\t")]
            missing = [n for n in ("user_id", "item_id", "timestamp") if n not in names]
            if missing:
                raise DataError(f"{path}: the header {first.strip()!r} lacks {missing} (RecBole atomic file)")
            columns = tuple(names.index(n) for n in ("user_id", "item_id", "timestamp"))
            rows, start = (line.rstrip("\r\n").split("\t") for line in f), 2
        else:
            header = [h.strip().lower() for h in next(csv.reader([first]))]
            aliases = [("user", "user_id", "userid"), ("item", "item_id", "itemid", "movieid", "movie_id"),
                       ("timestamp", "time", "ts")]
            found = [next((header.index(a) for a in names if a in header), None) for names in aliases]
            if all(c is not None for c in found):
                columns, rows, start = tuple(found), csv.reader(f), 2
            elif len(header) == 3:  # no header: user, item, timestamp
                columns, rows, start = (0, 1, 2), csv.reader(itertools.chain([first], f)), 1
            else:
                raise DataError(f"{path}:1: {first.strip()[:120]!r} is neither a header naming user, item and "
                                "timestamp columns nor a user,item,timestamp row")
        width = max(columns) + 1
        for line, row in enumerate(rows, start):
            if not row or row == [""]:
                continue
            if len(users) >= MAX_ROWS:
                raise DataError(f"{path}:{line}: more than {MAX_ROWS:,} interactions; split the log")
            if len(row) < width:
                raise DataError(f"{path}:{line}: {len(row)} field(s), expected at least {width} ({fmt} format)")
            user, item = row[columns[0]].strip(), row[columns[1]].strip()
            if not user or not item:
                raise DataError(f"{path}:{line}: empty user or item id")
            users.append(user)
            items.append(item)
            stamps.append(_timestamp(row[columns[2]].strip(), path, line))
    if not users:
        raise DataError(f"{path} holds no interactions")
    return Interactions(users, items, np.asarray(stamps, dtype=np.float64))


def synthetic_interactions(num_users: int, num_items: int, seed: int = 0, min_len: int = 5, max_len: int = 40,
                           follow: float = 0.8, skew: float = 1.1) -> Interactions:
    """Logs where item i is followed by item i+1 with probability `follow` (the planted rule),
    otherwise by an item drawn with Zipf-like popularity (exponent `skew`); each user starts at a
    uniformly drawn item, so that a large catalog occurs in full."""
    if num_users < 1 or not 2 <= num_items <= MAX_ITEMS:
        raise ConfigError(f"--synthetic {num_users},{num_items}: needs at least 1 user and 2 to {MAX_ITEMS:,} items")
    if seed < 0:
        raise ConfigError(f"--seed {seed} must be >= 0")
    if num_users * max_len > 50_000_000:
        raise ConfigError(f"--synthetic {num_users},{num_items}: {num_users * max_len:,} interactions is over the "
                          "50,000,000 this generator writes")
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, num_items + 1) ** skew
    popularity /= popularity.sum()
    users, items, stamps = [], [], []
    for u in range(num_users):
        n = int(rng.integers(min_len, max_len + 1))
        drawn = rng.choice(num_items, size=n, p=popularity)
        follows = rng.random(n) < follow
        seq = [int(rng.integers(num_items))]  # a uniform start: the whole catalog occurs
        for t in range(1, n):
            seq.append((seq[-1] + 1) % num_items if follows[t] else int(drawn[t]))
        users += [f"u{u}"] * n
        items += [f"i{i}" for i in seq]
        stamps += range(n)
    return Interactions(users, items, np.asarray(stamps, dtype=np.float64))


def _id_order(ids: list[str]) -> list[str]:
    unique = set(ids)
    if all(i.isascii() and i.isdigit() and len(i) <= 18 for i in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def write_dataset(rows: Interactions, out: str | Path, source: dict[str, Any], overwrite: bool = False) -> dict[str, Any]:
    """Write a dataset directory (see the module doc); `out` is replaced only with `overwrite`."""
    start = time.perf_counter()
    out = Path(out)
    check_output(out, overwrite)
    item_ids, user_ids = _id_order(rows.items), _id_order(rows.users)
    item_index = {v: i + 1 for i, v in enumerate(item_ids)}
    user_index = {v: i for i, v in enumerate(user_ids)}
    u = np.fromiter((user_index[v] for v in rows.users), dtype=np.int64, count=len(rows.users))
    it = np.fromiter((item_index[v] for v in rows.items), dtype=np.int32, count=len(rows.items))
    order = np.lexsort((np.arange(len(u)), rows.timestamps, u))  # by user, then time, then file order
    u, it = u[order], it[order]
    counts = np.bincount(u, minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if counts.max() > MAX_SEQUENCE:
        keep = np.concatenate([np.arange(max(a, b - MAX_SEQUENCE), b) for a, b in zip(offsets[:-1], offsets[1:])])
        it, counts = it[keep], np.minimum(counts, MAX_SEQUENCE)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    manifest = {"format": FORMAT, "num_users": len(user_ids), "num_items": len(item_ids),
                "interactions": int(len(it)), "users_with_test": int((counts >= 3).sum()),
                "split": "leave-one-out: last item test, second-last validation (users with >= 3 interactions)",
                "source": source}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        np.save(tmp / "items.npy", it)
        np.save(tmp / "offsets.npy", offsets)
        (tmp / "item_ids.json").write_text(json.dumps(item_ids))
        (tmp / "user_ids.json").write_text(json.dumps(user_ids))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        check_output(out, overwrite)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "seconds": round(time.perf_counter() - start, 2)}


def check_output(out: Path, overwrite: bool) -> None:
    def holds_dataset(d: Path) -> bool:
        try:
            return json.loads((d / MANIFEST).read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            return False

    check_output_dir(out, overwrite, "recsys dataset", holds_dataset)


def prepare_interactions(interactions: str | Path | None, out: str | Path, fmt: str = "auto",
                         synthetic: tuple[int, int] | None = None, seed: int = 0,
                         overwrite: bool = False) -> dict[str, Any]:
    """`lmfleet recsys prepare`: a log file, or a synthetic one, to a dataset directory."""
    if (interactions is None) == (synthetic is None):
        raise ConfigError("give one of --interactions PATH or --synthetic USERS,ITEMS")
    check_output(Path(out), overwrite)
    if synthetic is not None:
        rows = synthetic_interactions(*synthetic, seed=seed)
        source = {"synthetic": {"users": synthetic[0], "items": synthetic[1], "seed": seed, "rule": "i -> i+1"}}
    else:
        path = Path(interactions)
        rows = read_interactions(path, fmt)
        source = {"path": str(path.resolve()), "format": _detect(path) if fmt == "auto" else fmt,
                  "sha256": file_sha256(path)}
    return write_dataset(rows, out, source, overwrite)


class RecData:
    """A prepared dataset directory: each user's sequence and its leave-one-out split."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.path} is not a recsys dataset (no {MANIFEST}); make one with lmfleet recsys prepare")
        try:
            self.manifest = json.loads(manifest_path.read_text())
            # Memory-mapped: a header that lies about its size fails here, before any allocation.
            items = np.load(self.path / "items.npy", allow_pickle=False, mmap_mode="r")
            offsets = np.load(self.path / "offsets.npy", allow_pickle=False, mmap_mode="r")
            self.item_ids: list[str] = json.loads((self.path / "item_ids.json").read_text())
            self.num_items = int(self.manifest["num_items"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"{self.path}: cannot read the dataset ({type(exc).__name__}: {exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise DataError(f"{self.path}: format {self.manifest.get('format')!r} is not {FORMAT}")
        corrupt = DataError(f"{self.path}: items.npy, offsets.npy, item_ids.json and the manifest do not agree "
                            "(corrupt dataset)")
        if (items.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1 or items.dtype.kind not in "iu"
                or offsets.dtype.kind not in "iu" or not 1 <= self.num_items <= MAX_ITEMS
                or not isinstance(self.item_ids, list) or len(self.item_ids) != self.num_items):
            raise corrupt
        self.items = np.asarray(items, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.num_users = len(self.offsets) - 1
        if (self.offsets[0] != 0 or self.offsets[-1] != len(self.items) or (np.diff(self.offsets) < 0).any()
                or (len(self.items) and (self.items.min() < 1 or self.items.max() > self.num_items))):
            raise corrupt

    @functools.cached_property
    def user_ids(self) -> list[str]:
        """The original user ids, in index order."""
        try:
            ids = json.loads((self.path / "user_ids.json").read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path}: cannot read user_ids.json ({exc})") from None
        if not isinstance(ids, list) or len(ids) != self.num_users or not all(isinstance(u, str) for u in ids):
            raise DataError(f"{self.path}: user_ids.json does not list {self.num_users} user ids (corrupt dataset)")
        return ids

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user]:self.offsets[user + 1]]

    def train_sequence(self, user: int) -> np.ndarray:
        seq = self.sequence(user)
        return seq[:-2] if len(seq) >= 3 else seq

    def eval_users(self) -> np.ndarray:
        """Users with validation and test targets (>= 3 interactions)."""
        return np.flatnonzero(np.diff(self.offsets) >= 3)

    def case(self, user: int, split: str) -> tuple[np.ndarray, int]:
        """(history, target) of a user: validation predicts the second-last item from the
        training sequence, test the last from everything before it."""
        seq = self.sequence(user)
        return (seq[:-2], int(seq[-2])) if split == "valid" else (seq[:-1], int(seq[-1]))

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        try:
            for name in ("items.npy", "offsets.npy", "item_ids.json", "user_ids.json"):
                digest.update(f"{name}:{file_sha256(self.path / name)}\n".encode())
        except OSError as exc:
            raise DataError(f"{self.path}: cannot read the dataset ({exc})") from None
        return {"path": str(self.path.resolve()), "sha256": digest.hexdigest(), "num_users": self.num_users,
                "num_items": self.num_items, "interactions": int(len(self.items))}

    def identity(self) -> dict[str, Any]:
        """What a resumed run checks is the same data: one hash over the sequences and the id maps
        (computed once)."""
        return dict(self._identity)

    def item_counts(self) -> np.ndarray:
        """Training interactions per item (index 0 unused): the popularity baseline."""
        train = np.concatenate([self.train_sequence(u) for u in range(self.num_users)] or [np.zeros(0, np.int32)])
        return np.bincount(train, minlength=self.num_items + 1).astype(np.int64)


def left_pad(seq: np.ndarray, length: int) -> np.ndarray:
    """The last `length` items of `seq`, left-padded with 0."""
    seq = seq[-length:]
    out = np.zeros(length, dtype=np.int64)
    if len(seq):
        out[-len(seq):] = seq
    return out


class SequenceLoader:
    """Training batches of user sequences, a pure function of (seed, step, rank), like the
    language-model loader: each epoch visits every trainable user (>= 2 training items) once in an
    order drawn from (seed, epoch); rank r takes its slice of each step's global batch. A sample
    is the user's last `max_len + 1` training items: inputs are all but the last, targets all but
    the first (0 = padding). With `negatives` > 0, each position also gets that many items the
    user never trained on, drawn from a generator seeded by the sample's global index, so a
    sample is the same whatever the number of ranks."""

    def __init__(self, data: RecData, max_len: int, micro_batch: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, negatives: int = 1):
        self.data, self.max_len, self.micro_batch, self.grad_accum = data, max_len, micro_batch, grad_accum
        self.rank, self.world_size, self.seed, self.negatives = rank, world_size, seed, negatives
        lengths = np.array([len(data.train_sequence(u)) for u in range(data.num_users)])
        self.users = np.flatnonzero(lengths >= 2)
        if len(self.users) == 0:
            raise DataError(f"{data.path}: no user has 2 or more training interactions")
        self.step = 0
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = epoch_order(self.seed, epoch, len(self.users))
            self._epoch = epoch
        return self._order

    def _negatives(self, seen: np.ndarray, count: int, sample: int) -> np.ndarray:
        """`count` items not in `seen`, uniform, from a generator seeded by (seed, sample)."""
        rng = np.random.default_rng([self.seed, sample])
        n = self.data.num_items
        seen = np.unique(seen)
        if len(seen) >= n:  # the user trained on every item: any item will do
            return rng.integers(1, n + 1, size=count)
        if len(seen) > n // 2:  # mostly seen: draw from the rest directly
            return rng.choice(np.setdiff1d(np.arange(1, n + 1), seen), size=count)
        out = rng.integers(1, n + 1, size=count)
        while True:  # redraw the seen ones (fewer than half each round)
            bad = np.isin(out, seen)
            if not bad.any():
                return out
            out[bad] = rng.integers(1, n + 1, size=int(bad.sum()))

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """With negatives: inputs [B, L, 2 + negatives] (history, positive, negatives) and targets
        [B, L] (1.0 where a position has a target); without: inputs [B, L] and targets [B, L]
        (the next item, 0 = none)."""
        first = step * self.global_batch + (self.rank * self.grad_accum + micro) * self.micro_batch
        histories, targets, negs = [], [], []
        for sample in range(first, first + self.micro_batch):
            epoch, index = divmod(sample, len(self.users))
            seq = self.data.train_sequence(int(self.users[self._order_for(epoch)[index]]))
            window = seq[-(self.max_len + 1):]
            histories.append(left_pad(window[:-1], self.max_len))
            targets.append(left_pad(window[1:], self.max_len))
            if self.negatives:
                negs.append(self._negatives(seq, self.max_len * self.negatives, sample).reshape(self.max_len, -1))
        history, target = torch.from_numpy(np.stack(histories)), torch.from_numpy(np.stack(targets))
        if not self.negatives:
            return history, target
        neg = torch.from_numpy(np.stack(negs)).long() * (target != 0)[..., None]
        return torch.cat([history[..., None], target[..., None], neg], dim=-1), (target != 0).float()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch, "max_len": self.max_len,
                "negatives": self.negatives}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "global_batch", "max_len", "negatives"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key}={state.get(key)}, this run has {getattr(self, key)}")
        self.step = int(state["step"])
