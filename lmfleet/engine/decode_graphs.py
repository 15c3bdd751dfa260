"""Decode steps as CUDA graphs: the whole forward of a step made only of single-token decodes,
captured once per shape and replayed, so a step costs one launch instead of hundreds.

A graph needs fixed shapes and addresses. The step's inputs (token ids, positions, cache slots of
the new tokens, context lengths, block tables) live in preallocated buffers that each step fills;
the batch is padded up to a captured batch size and the block tables up to a captured number of
blocks (powers of two). Padding rows write their K/V into a scratch block that no sequence owns,
and their logits are dropped. The attention is built from these device tensors alone
(`StaticDecodeAttention`), with no host synchronisation.

Every shape is captured at start-up (`capture_all`; a shape is captured on first use otherwise) and
all graphs share one memory pool. A shape whose capture fails runs eagerly; the others keep theirs. Off CUDA the same padded,
fixed-shape forward runs eagerly (`capture=False`), which is how the CPU tests check it token for
token against the regular path.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lmfleet.engine.attention import StaticDecodeAttention, pad_tables
from lmfleet.engine.step import StepMetadata

if TYPE_CHECKING:
    from lmfleet.engine.runner import ModelRunner

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then multiples of 16, the last one covering max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs] if not sizes or sizes[-1] < max_num_seqs else sizes


def block_buckets(max_blocks: int) -> list[int]:
    """Captured block-table widths: powers of two, the last one `max_blocks`."""
    sizes = []
    width = 1
    while width < max_blocks:
        sizes.append(width)
        width *= 2
    return sizes + [max_blocks]


def bucket(n: int, sizes: list[int]) -> int:
    return next(s for s in sizes if s >= n)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class DecodeGraphs:
    """Runs decode-only steps of up to `max_num_seqs` sequences at a fixed shape, replaying a CUDA
    graph per (batch size, block-table width) when `capture`. A shape whose capture failed runs
    eagerly (`run` returns None for it); the other shapes keep their graphs."""

    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int, capture: bool):
        self.runner, self.capture = runner, capture
        bs = runner.block_size
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.block_widths = block_buckets(-(-max_model_len // bs))
        rows, device = self.batch_sizes[-1], runner.device
        # Rows: token id, position, slot of the new token. Padding rows (position 0) write to the
        # scratch slot and attend to position 0 of block 0.
        self.meta = torch.zeros(3, rows, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(rows, self.block_widths[-1], dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.failed: set[tuple[int, int]] = set()
        self.pool = None

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [(rows, width) for rows in self.batch_sizes for width in self.block_widths]

    def fits(self, meta: StepMetadata) -> bool:
        return meta.num_seqs <= self.batch_sizes[-1] and meta.decode_only

    def capture_all(self) -> None:
        """Capture the graph of every shape (at start-up): a bounded set, logged with its cost."""
        if not self.capture:
            return
        began = time.perf_counter()
        self.meta.zero_()
        self.meta[2].fill_(self.runner.scratch_slot)  # every row a padding row: writes go to scratch
        self.block_tables.zero_()
        for shape in self.shapes:
            if shape not in self.graphs and shape not in self.failed:
                self._try_capture(*shape)
        log.info("captured %d decode CUDA graphs (%d batch sizes x %d block-table widths) in %.1f s; %d failed",
                 len(self.graphs), len(self.batch_sizes), len(self.block_widths), time.perf_counter() - began,
                 len(self.failed))

    def run(self, meta: StepMetadata) -> torch.Tensor | None:
        """Logits [meta.num_seqs, vocab] of a decode-only step (every row), or None when its shape
        has no graph (its capture failed): the caller runs the step eagerly."""
        bs, scratch = self.runner.block_size, self.runner.scratch_slot
        num_seqs = meta.num_seqs
        rows = bucket(num_seqs, self.batch_sizes)
        host = [[0] * rows, [0] * rows, [scratch] * rows]
        tables = []
        for i, (pos, table) in enumerate(zip(meta.starts, meta.block_tables)):
            host[0][i], host[1][i] = meta.token_ids[i], pos
            host[2][i] = table[pos // bs] * bs + pos % bs
            tables.append(table[:pos // bs + 1])
        width = bucket(max(len(t) for t in tables), self.block_widths)
        if (rows, width) in self.failed:
            return None
        self.meta[:, :rows].copy_(torch.tensor(host))
        self.block_tables[:rows, :width].copy_(pad_tables(tables + [[]] * (rows - num_seqs), width))
        if not self.capture:
            return self._forward(rows, width)[:num_seqs]
        graph = self.graphs.get((rows, width)) or self._try_capture(rows, width)
        if graph is None:
            return None
        graph.graph.replay()
        return graph.logits[:num_seqs]

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        r = self.runner
        ids, positions, slots = self.meta[:, :rows]
        attention = StaticDecodeAttention(r.k_cache, r.v_cache, r.window, r.block_size, slots,
                                          self.block_tables[:rows, :width], positions + 1)
        hidden = r.model.hidden_states(ids[None], positions, cache=attention)
        return r.model.lm_head(hidden[0])

    def _try_capture(self, rows: int, width: int) -> _Graph | None:
        try:
            return self._capture(rows, width)
        except RuntimeError as exc:  # an operation this build cannot capture, no memory left, ...
            self.failed.add((rows, width))
            warnings.warn(f"CUDA graph capture of the decode step for {rows} sequences x {width} blocks failed "
                          f"({exc}); steps of that shape run eagerly", RuntimeWarning, stacklevel=2)
            return None

    def _capture(self, rows: int, width: int) -> _Graph:
        # Warm up on a side stream (library handles and workspaces are created outside the capture);
        # the warm-up computes this very step, and writes the same K/V the replay will write again.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._forward(rows, width)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine may run on a server's background thread while others use CUDA.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = self._forward(rows, width)
        self.graphs[(rows, width)] = entry = _Graph(graph, logits)
        return entry
