"""Attention over the paged KV cache.

The model hands each attention layer's q/k/v for the step's new tokens to a cache object
(`Transformer.forward(..., cache=)`), which writes the new keys/values into their cache slots and
attends. `step_tensors` turns a step's metadata into the tensors it needs. `PagedAttention` serves
a regular step: a sequence's prefill chunk against its cached
context, and all single-token decodes together in one padded call. `StaticDecodeAttention`
serves a decode step of fixed shape built from device tensors only, as CUDA graphs need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmfleet.engine.step import StepMetadata
from lmfleet.model.transformer import attention_mask


@dataclass
class PrefillSegment:
    start: int  # offset in the flat batch
    length: int  # new tokens (> 1)
    context: int  # tokens in the cache after this step (cached + new)
    fresh: bool  # no cached context before this step
    slots: torch.Tensor | None = None  # cache slots of all `context` tokens, when needed


def decode_attention(k_cache: torch.Tensor, v_cache: torch.Tensor, qd: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of single-token queries qd [B, H, D] over their cached context -> [B, H, D]; `slots`
    [B * ctx] are the cache slots of each row's context (padded), `mask` [B, 1, 1, ctx] or None.

    Grouped-query: the query heads sharing a KV head become that head's query rows, so K/V are
    gathered once per KV head and never repeated."""
    batch, n_heads, head_dim = qd.shape
    n_kv = k_cache.shape[1]
    qd = qd.reshape(batch, n_kv, n_heads // n_kv, head_dim)  # [B, KVH, H/KVH, D]
    shape = (batch, -1, n_kv, head_dim)
    kd = k_cache.index_select(0, slots).view(shape).permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
    vd = v_cache.index_select(0, slots).view(shape).permute(0, 2, 1, 3)
    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
    return od.reshape(batch, n_heads, head_dim)


def token_slots(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of every token position of the given block ids: [..., n] -> [..., n * block_size]."""
    return (blocks[..., None] * block_size + torch.arange(block_size, device=blocks.device)).flatten(-2)


def decode_mask(context_lens: torch.Tensor, num_keys: int, window: int | None) -> torch.Tensor:
    """[rows, 1, 1, keys] bool: which of the first `num_keys` cached positions the decode of each
    row (its query at position context - 1) may attend to."""
    key_pos = torch.arange(num_keys, device=context_lens.device)
    return attention_mask((context_lens - 1)[:, None], key_pos, window)[:, None]


def split_by_context(context_lens: list[int], max_groups: int, min_rows: int = 4) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of decodes sorted by context length: up to `max_groups` groups of at least
    `min_rows` rows when that cuts the padded context by a fifth or more, else one group."""
    n = len(context_lens)
    groups = min(max_groups, n // min_rows)
    if groups <= 1:
        return [(0, n)] if n else []
    bounds = [n * g // groups for g in range(groups + 1)]
    ranges = list(zip(bounds, bounds[1:]))
    padded = sum((hi - lo) * max(context_lens[lo:hi]) for lo, hi in ranges)
    return ranges if padded <= 0.8 * n * max(context_lens) else [(0, n)]


def pad_tables(tables: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Block tables as one [rows, width] tensor, padded with block 0 (masked or never read)."""
    width = width if width is not None else max((len(t) for t in tables), default=0)
    return torch.tensor([t[:width] + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(-1, width)


@dataclass
class StepTensors:
    """A step's inputs as tensors on the model's device: token ids [N], positions [N], the cache slot
    of every new token [N], and what attention needs (built by `step_tensors`)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    prefills: list[PrefillSegment]
    decode_index: torch.Tensor  # flat rows of the single-token queries
    decode_groups: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]  # (lo, hi, slots, mask)
    sample_rows: torch.Tensor  # flat rows whose logits the step returns


def step_tensors(meta: StepMetadata, block_size: int, window: int | None, device: torch.device,
                 max_decode_groups: int = 1) -> StepTensors:
    """Positions and cache slots of every new token in a few tensor operations (no per-token Python),
    the prefill segments, and the decodes padded per group of similar context length (the metadata
    lists decodes in ascending context order when grouping is wanted)."""
    lengths = torch.tensor(meta.lengths, dtype=torch.long)
    starts = torch.tensor(meta.starts, dtype=torch.long)
    ends = lengths.cumsum(0)
    offsets = ends - lengths
    seq_of_token = torch.repeat_interleave(torch.arange(meta.num_seqs), lengths)
    positions = starts[seq_of_token] + torch.arange(len(meta.token_ids)) - offsets[seq_of_token]
    tables = pad_tables(meta.block_tables)
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    prefills, decode_rows, decode_context, decode_seqs = [], [], [], []
    for i, (start, length, offset) in enumerate(zip(meta.starts, meta.lengths, offsets.tolist())):
        if length == 1:
            decode_rows.append(offset)
            decode_context.append(start + 1)
            decode_seqs.append(i)
            continue
        seg = PrefillSegment(offset, length, start + length, start == 0)
        if not seg.fresh or (window is not None and length > window):
            seg.slots = token_slots(tables[i, :-(-seg.context // block_size)], block_size)[:seg.context].to(device)
        prefills.append(seg)
    groups = []
    for lo, hi in split_by_context(decode_context, max_decode_groups):
        context = decode_context[lo:hi]
        max_ctx = max(context)
        group_tables = tables[decode_seqs[lo:hi], :-(-max_ctx // block_size)]
        group_slots = token_slots(group_tables, block_size)[:, :max_ctx].flatten()
        mask = decode_mask(torch.tensor(context), max_ctx, window)
        groups.append((lo, hi, group_slots.to(device), None if bool(mask.all()) else mask.to(device)))
    sample_rows = (ends - 1)[meta.sampled] if meta.sampled else torch.zeros(0, dtype=torch.long)
    return StepTensors(torch.tensor(meta.token_ids, device=device), positions.to(device), slots.to(device),
                       prefills, torch.tensor(decode_rows, dtype=torch.long, device=device), groups,
                       sample_rows.to(device))


class PagedAttention:
    """The attention cache of one step; passed to the model as `cache=`: writes each new token's K/V
    to its slot, runs each prefill segment against its cached context, and all single-token decodes
    together (one padded call per group of similar context length)."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, step: StepTensors):
        self.k_cache, self.v_cache, self.window = k_cache, v_cache, window
        self.slot_mapping, self.prefills = step.slot_mapping, step.prefills
        self.decode_index, self.decode_groups = step.decode_index, step.decode_groups
        # Every token of the step is a decode (the steady state): no scatter of the outputs.
        self.decode_only = not step.prefills and len(step.decode_index) == len(step.slot_mapping)

    def _decode(self, k_cache: torch.Tensor, v_cache: torch.Tensor, qd: torch.Tensor) -> torch.Tensor:
        outs = [decode_attention(k_cache, v_cache, qd[lo:hi], slots, mask)
                for lo, hi, slots, mask in self.decode_groups]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]  # [slots, KVH, D]
        new_k, new_v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, KVH, D]
        k_cache.index_copy_(0, self.slot_mapping, new_k)
        v_cache.index_copy_(0, self.slot_mapping, new_v)
        if self.decode_only:
            return self._decode(k_cache, v_cache, q[0].transpose(0, 1))[None].transpose(1, 2)
        out = torch.empty_like(q)
        for s in self.prefills:
            qs = q[:, :, s.start:s.start + s.length]
            if s.slots is None:  # fresh and within the window: plain causal attention on the chunk
                ks, vs = k[:, :, s.start:s.start + s.length], v[:, :, s.start:s.start + s.length]
                out[:, :, s.start:s.start + s.length] = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, enable_gqa=True)
                continue
            ks = k_cache.index_select(0, s.slots).transpose(0, 1)[None]  # [1, KVH, ctx, D]
            vs = v_cache.index_select(0, s.slots).transpose(0, 1)[None]
            q_pos = torch.arange(s.context - s.length, s.context, device=q.device)
            mask = attention_mask(q_pos, torch.arange(s.context, device=q.device), self.window)
            out[:, :, s.start:s.start + s.length] = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, enable_gqa=True)
        if len(self.decode_index):
            qd = q[0, :, self.decode_index].transpose(0, 1)
            out[0, :, self.decode_index] = self._decode(k_cache, v_cache, qd).transpose(0, 1)
        return out


class StaticDecodeAttention(PagedAttention):
    """The cache of a fixed-shape decode step, computed on the device from tensors alone (no host
    synchronisation, so it can be captured in a CUDA graph): `slot_mapping` [B] (where the new K/V
    go), `block_tables` [B, W] and `context_lens` [B]; every row attends over W blocks, masked."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, block_size: int,
                 slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor):
        self.k_cache, self.v_cache, self.window = k_cache, v_cache, window
        self.slot_mapping, self.prefills, self.decode_only = slot_mapping, [], True
        self.decode_groups = [(0, len(context_lens), token_slots(block_tables, block_size).flatten(),
                               decode_mask(context_lens, block_tables.shape[1] * block_size, window))]
