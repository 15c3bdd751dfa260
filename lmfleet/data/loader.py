"""TokenLoader: training batches from corpus shards, a pure function of (seed, step, rank).

The train split is cut into non-overlapping windows of `seq_len + 1` tokens. Each epoch visits
every window once in an order drawn from (seed, epoch). Step `s` consumes global samples
`s * global_batch ... (s + 1) * global_batch - 1`; rank `r` of `W` takes the `r`-th contiguous slice,
split into micro-batches. The global token stream therefore does not depend on the number of
ranks: one process with batch 2b sees exactly what two processes with batch b see together, and
a run resumed at another world size with the same global batch continues the same stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmfleet.data.corpus import Corpus
from lmfleet.errors import DataError


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which an epoch visits n samples: a permutation drawn from (seed, epoch) alone,
    so it is the same whatever the number of ranks."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).numpy()

class TokenLoader:
    def __init__(self, corpus: Corpus, seq_len: int, micro_batch: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, split: str = "train"):
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shards = corpus.shards(split)
        window = seq_len + 1
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        if sum(counts) == 0:
            raise DataError(f"corpus {corpus.path} split {split!r} has fewer than seq_len+1={window} tokens "
                            "in every shard; lower data.seq_len or add text")
        # (shard index, start offset) of every window, in corpus order.
        self.windows = np.concatenate([np.stack([np.full(n, i), np.arange(n) * seq_len], axis=1)
                                       for i, n in enumerate(counts) if n > 0])
        self.step = 0
        self._epoch, self._order = -1, np.zeros(0, dtype=np.int64)

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def _order_for(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = epoch_order(self.seed, epoch, self.num_windows)
            self._epoch = epoch
        return self._order

    def sample_indices(self, step: int, micro: int) -> list[int]:
        """The windows (indices into the train split's windows) of one micro-step on this rank."""
        first = step * self.global_batch + (self.rank * self.grad_accum + micro) * self.micro_batch
        indices = []
        for sample in range(first, first + self.micro_batch):
            epoch, index = divmod(sample, self.num_windows)
            indices.append(int(self._order_for(epoch)[index]))
        return indices

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets [micro_batch, seq_len] of one micro-step of one optimizer step."""
        rows = np.stack([np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)
                         for shard, start in self.windows[self.sample_indices(step, micro)]])
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def __iter__(self):
        """Yields the micro-batches of successive steps, starting at `self.step`."""
        while True:
            for micro in range(self.grad_accum):
                yield self.batch(self.step, micro)
            self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "global_batch", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"loader state has {key}={state.get(key)}, this run has {getattr(self, key)}")
        self.step = int(state["step"])


def eval_windows(corpus: Corpus, seq_len: int, max_tokens: int, split: str = "val") -> list[np.ndarray]:
    """Consecutive non-overlapping windows from the start of a split, up to `max_tokens` targets."""
    windows = []
    budget = max_tokens
    for shard in corpus.shards(split):
        for start in range(0, len(shard) - 1, seq_len):
            if budget <= 0:
                return windows
            piece = np.asarray(shard[start:start + seq_len + 1], dtype=np.int64)
            if len(piece) < 2:
                continue
            windows.append(piece[: budget + 1])
            budget -= len(windows[-1]) - 1
    return windows
