"""Continuous batching: every step mixes decodes and (chunks of) prefills under a token budget.

Each step, running sequences are served first (a decode is one token; a prefill in progress gets
its next chunk), in priority then arrival order; a sequence that needs a block when the pool is
empty preempts the lowest-priority, latest-arrived running sequence, whose blocks are freed and
whose tokens are recomputed later. Then waiting sequences are admitted while the budget, the
sequence limit and the pool allow; a prompt longer than the remaining budget is prefilled in
chunks over several steps when chunked prefill is on.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from lmfleet.engine.block_manager import BlockManager
from lmfleet.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence computes this step

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.failed: list[tuple[Sequence, Exception]] = []  # admissions that raised, for the engine to fail

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @staticmethod
    def _order(seq: Sequence) -> tuple[int, float, int]:
        return (seq.params.priority, seq.arrival_time, seq.seq_id)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preemptions = self.num_preemptions
        # 1. Running sequences, most important first; preempt from the other end when out of blocks.
        self.running.sort(key=self._order)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.can_allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self.block_manager.allocate(seq, num_new)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            i += 1
        # 2. Waiting sequences, if every running one was served and none was preempted.
        if len(batch.seqs) == len(self.running) and self.num_preemptions == preemptions:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        waiting = sorted(self.waiting, key=self._order)
        for seq in waiting:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            try:
                num_new = self._try_admit(seq, budget, bool(batch.seqs))
            except Exception as exc:  # noqa: BLE001 - this sequence fails alone (the engine frees it)
                self.failed.append((seq, exc))
                continue
            if num_new is None:
                break
            if num_new == 0:
                continue
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _try_admit(self, seq: Sequence, budget: int, batch_has_seqs: bool) -> int | None:
        """Admit one waiting sequence: the tokens it computes this step; 0 if it must wait for its
        leader; None if it does not fit now (nothing after it is admitted either)."""
        if self._waits_for_leader(seq):
            return 0
        self.block_manager.allocate_prefix(seq)
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining > budget and not self.enable_chunked_prefill:
            if batch_has_seqs:
                self.block_manager.deallocate(seq)
                return None  # wait for a step with room for the whole prompt
            num_new = remaining  # a prompt larger than the whole budget runs alone
        else:
            num_new = min(remaining, budget)
        if not self.block_manager.can_allocate(seq, num_new):
            self.block_manager.deallocate(seq)
            return None
        self.block_manager.allocate(seq, num_new)
        self.block_manager.count_admission(seq)
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        seq.scheduled_time = seq.scheduled_time or time.monotonic()
        self.running.append(seq)
        return num_new

    def take_failed(self) -> list[tuple[Sequence, Exception]]:
        failed, self.failed = self.failed, []
        return failed

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Choices 1..n-1 of a request start once choice 0's prompt is cached, to share its blocks."""
        leader = seq.leader
        return (leader is not None and self.block_manager.enable_prefix_caching
                and leader.status == SequenceStatus.RUNNING
                and leader.num_computed_tokens < leader.num_prompt_tokens)

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        self.block_manager.deallocate(seq)
        self.discard(seq)

    def discard(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (its blocks already released, or beyond repair)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
