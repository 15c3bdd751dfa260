"""One step's work as plain data: built from `Sequence`s on the scheduling rank, executed from lists.

`prepare_step` is the only place that reads `Sequence` objects for the model; `ModelRunner.execute`
and everything under it see a `StepMetadata` alone, so a tensor-parallel worker can run a step from
metadata it was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmfleet.engine.scheduler import ScheduledBatch


@dataclass
class StepMetadata:
    """For each scheduled sequence, in execution order: how many of its tokens the cache held before
    the step (`starts`), how many it computes now (`lengths`; their ids are concatenated in
    `token_ids`), and its block table; `sampled`: the sequences (indices in that order) that
    complete their known tokens this step, whose next-token logits the step returns."""

    token_ids: list[int]
    starts: list[int]
    lengths: list[int]
    block_tables: list[list[int]]
    sampled: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.starts)

    @property
    def decode_only(self) -> bool:
        return all(length == 1 for length in self.lengths)


def prepare_step(batch: ScheduledBatch, sort_by_context: bool = False) -> tuple[StepMetadata, list[int]]:
    """The step's metadata and, for each row of the logits it returns, the index of its sequence in
    `batch.seqs`. `sort_by_context`: sequences in ascending context order (the CPU runner groups
    decodes of similar context length)."""
    order = range(len(batch.seqs))
    if sort_by_context:
        order = sorted(order, key=lambda i: batch.seqs[i].num_computed_tokens)
    token_ids: list[int] = []
    meta = StepMetadata(token_ids, [], [], [], [])
    sampled_index = []
    for position, i in enumerate(order):
        seq, length = batch.seqs[i], batch.num_new_tokens[i]
        start = seq.num_computed_tokens
        token_ids.extend(seq.token_ids[start:start + length])
        meta.starts.append(start)
        meta.lengths.append(length)
        meta.block_tables.append(seq.block_table)
        if start + length == seq.num_tokens:
            meta.sampled.append(position)
            sampled_index.append(i)
    return meta, sampled_index
