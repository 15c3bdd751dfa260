"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, hash-chained prefix reuse.

A block that fills up gets a SHA-256 hash of (parent block's hash, its token ids), once, when it
fills; a new sequence whose prompt starts with the same tokens reuses those blocks instead of
recomputing them, and a cached block counts as a hit only if its parent hash and its tokens both
match (a collision of Python's `hash` could otherwise hand one request another's cache). Blocks whose
reference count drops to zero stay cached, in least-recently-freed order, until a fresh block is
needed: then the oldest is evicted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from lmfleet.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    parent_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()

    def forget(self) -> None:
        self.hash, self.parent_hash, self.token_ids = None, None, ()


def block_hash(parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """SHA-256 of the parent block's hash and this block's token ids (as 64-bit integers)."""
    digest = hashlib.sha256(parent or b"\0" * 32)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.prefix_queries = 0  # prompt tokens of admitted requests, looked up in the prefix cache
        self.prefix_hits = 0  # of those, found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]  # evicted from the prefix cache
        block.forget()
        block.ref_count = 1
        return block_id

    def _take_cached(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def allocate_prefix(self, seq: Sequence) -> None:
        """On admission: reuse cached blocks for the longest cached prefix of the sequence's tokens.

        The last token is always left to compute (its logits are needed), so only full blocks
        before it are looked up. Counters are the scheduler's to update, once per admitted request
        (`count_admission`): an admission that fails for lack of room is undone and tried again."""
        assert not seq.block_table, "sequence already holds blocks"
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        if not self.enable_prefix_caching:
            return
        parent = None
        for i in range((seq.num_tokens - 1) // self.block_size):
            tokens = tuple(seq.block_tokens(i, self.block_size))
            h = block_hash(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.parent_hash != parent or block.token_ids != tokens:
                break
            self._take_cached(block_id)
            seq.block_table.append(block_id)
            parent = h
        seq.num_computed_tokens = seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens *= self.block_size

    def count_admission(self, seq: Sequence) -> None:
        """Count an admitted sequence's prompt in the prefix-cache counters, the first time it is
        admitted (not again after a preemption, when its tokens include output)."""
        if seq.num_preemptions:
            return
        seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_prompt_tokens
            self.prefix_hits += seq.num_cached_tokens

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, seq.num_blocks(self.block_size, seq.num_computed_tokens + num_new_tokens)
                   - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Fresh blocks so the cache can hold `num_new_tokens` more tokens of `seq`."""
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_fresh())

    def commit(self, seq: Sequence) -> None:
        """After a step: hash the blocks that filled with computed tokens since the last commit."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        first = seq.num_hashed_blocks
        parent = self.blocks[seq.block_table[first - 1]].hash if first else None
        for i in range(first, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                tokens = tuple(seq.block_tokens(i, self.block_size))
                block.hash, block.parent_hash, block.token_ids = block_hash(parent, tokens), parent, tokens
                self.hash_to_block.setdefault(block.hash, block.block_id)
            parent = block.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def deallocate(self, seq: Sequence) -> None:
        """Release the sequence's blocks (cached ones stay reusable until evicted)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                if block.hash is None or self.hash_to_block.get(block.hash) != block_id:
                    block.forget()
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = seq.num_hashed_blocks = 0
