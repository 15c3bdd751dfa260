"""One forward over a flat batch of mixed prefill chunks and decodes, attending over the paged cache.

The model sees `input_ids [1, N]` with per-token positions; its attention layers hand q/k/v to a
`PagedAttention` context, which writes the new keys/values into their cache slots and attends:
a sequence's whole chunk against its cached context, and all single-token decodes together in
one padded call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.engine.scheduler import ScheduledBatch
from lmfleet.model.transformer import Transformer, attention_mask


@dataclass
class _Prefill:
    start: int  # offset in the flat batch
    length: int  # new tokens (> 1)
    context: int  # tokens in the cache after this step (cached + new)
    fresh: bool  # no cached context before this step
    slots: torch.Tensor | None = None  # cache slots of all `context` tokens, when needed


class PagedAttention:
    """The attention cache of one step; passed to the model as `cache=`.

    Built from plain lists in a few tensor operations, whatever the batch size: the slot of every
    new token (where its K/V go), the prefill segments, and for the decodes a padded slot table
    [B, max_ctx] with its mask, so that all decodes attend in one call."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None, block_size: int,
                 slot_mapping: list[int], prefills: list[_Prefill], prefill_tables: list[list[int]],
                 decode_rows: list[int], decode_tables: list[list[int]], decode_context: list[int]):
        self.k_cache, self.v_cache, self.window = k_cache, v_cache, window
        device = k_cache.device
        self.slot_mapping = torch.tensor(slot_mapping, device=device)
        offsets = torch.arange(block_size)
        for seg, table in zip(prefills, prefill_tables):
            if not seg.fresh or (window is not None and seg.length > window):
                blocks = torch.tensor(table, dtype=torch.long)
                seg.slots = (blocks[:, None] * block_size + offsets).flatten()[:seg.context].to(device)
        self.prefills = prefills
        self.decode_index = torch.tensor(decode_rows, dtype=torch.long, device=device)
        # Every token of the step is a decode (the steady state): no scatter of the outputs.
        self.decode_only = not prefills and len(decode_rows) == len(slot_mapping)
        if decode_rows:
            max_blocks = max(len(t) for t in decode_tables)
            blocks = torch.tensor([t + [0] * (max_blocks - len(t)) for t in decode_tables], dtype=torch.long)
            max_ctx = max(decode_context)
            slots = (blocks[:, :, None] * block_size + offsets).flatten(1)[:, :max_ctx]
            context = torch.tensor(decode_context)[:, None]
            key_pos = torch.arange(max_ctx)[None]
            mask = key_pos < context  # padding slots point at block 0 and are masked out
            if window is not None:
                mask &= key_pos >= context - window
            self.decode_slots = slots.flatten().to(device)  # [B * max_ctx]
            # No mask at all when nothing is padded or windowed (a single decode, equal lengths).
            self.decode_mask = None if bool(mask.all()) else mask[:, None, None, :].to(device)

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

    def _decode(self, k_cache: torch.Tensor, v_cache: torch.Tensor, qd: torch.Tensor) -> torch.Tensor:
        """Attention of the decode queries qd [B, H, D] over their cached context -> [B, H, D].

        Grouped-query: the query heads sharing a KV head become that head's query rows, so K/V are
        gathered once per KV head and never repeated."""
        batch, n_heads, head_dim = qd.shape
        n_kv = k_cache.shape[1]
        qd = qd.reshape(batch, n_kv, n_heads // n_kv, head_dim)  # [B, KVH, H/KVH, D]
        shape = (batch, -1, n_kv, head_dim)
        kd = k_cache.index_select(0, self.decode_slots).view(shape).permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
        vd = v_cache.index_select(0, self.decode_slots).view(shape).permute(0, 2, 1, 3)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask)
        return od.reshape(batch, n_heads, head_dim)


class TransposedLinear(nn.Module):
    """`x @ W^T` with W^T stored contiguous: on CPU, matrix-vector products for decode read the
    weights about twice as fast this way (measured in benchmarks/engine_vs_hf.py's set-up)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


class PackedLinear(nn.Module):
    """`x @ W^T` through oneDNN with W packed once into its blocked layout (CPU, fp32). Against
    MKL's matmul on the same weights it is 1.3-3x faster for the 8-256 row products of batched
    decode and no slower for one row (numbers in docs/engine.md)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 32):
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class RowAdaptiveLinear(nn.Module):
    """The output head on CPU: a single row (batch-1 decode) reads W^T-contiguous weights, which
    is ~1.8x faster than oneDNN for a 32k-wide matrix-vector product on the machines measured; more
    rows use the packed weights. Holds the head's weights twice (fp32 CPU only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.single, self.packed = TransposedLinear(linear), PackedLinear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single(x) if x.numel() == x.shape[-1] else self.packed(x)


def packed_linears_supported(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def prepare_cpu_linears(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for the fastest CPU form: oneDNN-packed for fp32 (the output head
    row-adaptive), W^T-contiguous otherwise (in place; the model is the engine's own)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                if not packed_linears_supported(child.weight.dtype):
                    setattr(module, child_name, TransposedLinear(child))
                elif child_name == "lm_head":
                    setattr(module, child_name, RowAdaptiveLinear(child))
                else:
                    setattr(module, child_name, PackedLinear(child))
    return model


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        model.fuse_projections()
        if model.embed_tokens.weight.device.type == "cpu":
            prepare_cpu_linears(model)
        self.model = model
        self.block_size = block_size
        cfg = model.config
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.window = cfg.sliding_window

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int) -> int:
        cfg = model.config
        itemsize = model.embed_tokens.weight.element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits [n, vocab] (fp32) for the sequences that complete their known tokens this step,
        and their indices in `batch.seqs`."""
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        prefills, prefill_tables = [], []
        decode_rows, decode_tables, decode_context = [], [], []
        sample_rows, sample_idx = [], []
        offset = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start, table = seq.num_computed_tokens, seq.block_table
            if n == 1:
                tokens.append(seq.token_ids[start])
                positions.append(start)
                slot_mapping.append(table[start // bs] * bs + start % bs)
                decode_rows.append(offset)
                decode_tables.append(table)
                decode_context.append(start + 1)
            else:
                tokens.extend(seq.token_ids[start:start + n])
                positions.extend(range(start, start + n))
                slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
                prefills.append(_Prefill(offset, n, start + n, start == 0))
                prefill_tables.append(table)
            offset += n
            if start + n == seq.num_tokens:
                sample_rows.append(offset - 1)
                sample_idx.append(i)
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor(positions, device=self.device)
        attention = PagedAttention(self.k_cache, self.v_cache, self.window, bs, slot_mapping, prefills,
                                   prefill_tables, decode_rows, decode_tables, decode_context)
        hidden = self.model.hidden_states(ids, pos, cache=attention)
        if not sample_rows:
            return torch.zeros(0, self.model.config.vocab_size), []
        logits = self.model.lm_head(hidden[0, torch.tensor(sample_rows, device=self.device)])
        return logits.float(), sample_idx
