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
class _Segment:
    start: int  # offset in the flat batch
    length: int  # new tokens
    context: int  # tokens in the cache after this step (cached + new)
    slots: torch.Tensor  # cache slots of all `context` tokens
    fresh: bool  # no cached context before this step


class PagedAttention:
    """The attention cache of one step; passed to the model as `cache=`."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None):
        self.k_cache, self.v_cache, self.window = k_cache, v_cache, window
        self.slot_mapping = torch.zeros(0, dtype=torch.long)
        self.prefills: list[_Segment] = []
        self.decode_index = torch.zeros(0, dtype=torch.long)  # flat positions of decode tokens
        self.decode_slots = torch.zeros(0, 0, dtype=torch.long)  # [B, max_ctx], padded
        self.decode_mask = torch.zeros(0, 1, 1, 0, dtype=torch.bool)

    def prepare(self, segments: list[_Segment], positions: torch.Tensor, device: torch.device) -> None:
        self.slot_mapping = torch.cat([s.slots[s.context - s.length:] for s in segments]).to(device)
        self.prefills = [s for s in segments if s.length > 1]
        decodes = [s for s in segments if s.length == 1]
        if decodes:
            max_ctx = max(s.context for s in decodes)
            slots = torch.zeros(len(decodes), max_ctx, dtype=torch.long)
            mask = torch.zeros(len(decodes), max_ctx, dtype=torch.bool)
            for i, s in enumerate(decodes):
                slots[i, :s.context] = s.slots
                lo = 0 if self.window is None else max(0, s.context - self.window)
                mask[i, lo:s.context] = True
            self.decode_index = torch.tensor([s.start for s in decodes], device=device)
            self.decode_slots = slots.to(device)
            self.decode_mask = mask[:, None, None, :].to(device)
        else:
            self.decode_index = torch.zeros(0, dtype=torch.long, device=device)
        for s in self.prefills:
            s.slots = s.slots.to(device)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.k_cache[layer_idx], self.v_cache[layer_idx]  # [slots, KVH, D]
        new_k, new_v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, KVH, D]
        k_cache[self.slot_mapping] = new_k
        v_cache[self.slot_mapping] = new_v
        out = torch.empty_like(q)
        for s in self.prefills:
            qs = q[:, :, s.start:s.start + s.length]
            if s.fresh and (self.window is None or s.length <= self.window):
                ks, vs = k[:, :, s.start:s.start + s.length], v[:, :, s.start:s.start + s.length]
                out[:, :, s.start:s.start + s.length] = F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, enable_gqa=True)
                continue
            ks = k_cache[s.slots].transpose(0, 1)[None]  # [1, KVH, ctx, D]
            vs = v_cache[s.slots].transpose(0, 1)[None]
            q_pos = torch.arange(s.context - s.length, s.context, device=q.device)
            mask = attention_mask(q_pos, torch.arange(s.context, device=q.device), self.window)
            out[:, :, s.start:s.start + s.length] = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, enable_gqa=True)
        if len(self.decode_index):
            qd = q[0, :, self.decode_index].transpose(0, 1)[:, :, None]  # [B, H, 1, D]
            kd = k_cache[self.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, ctx, D]
            vd = v_cache[self.decode_slots].permute(0, 2, 1, 3)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask, enable_gqa=True)
            out[0, :, self.decode_index] = od[:, :, 0].transpose(0, 1)
        return out


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


def transpose_linears(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear for a TransposedLinear (in place; the model is the engine's own)."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, TransposedLinear(child))
    return model


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        if model.embed_tokens.weight.device.type == "cpu":
            transpose_linears(model)
        self.model = model
        self.block_size = block_size
        cfg = model.config
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        shape = (cfg.num_hidden_layers, num_blocks * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.window = cfg.sliding_window
        self._block_offsets = torch.arange(block_size)

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int) -> int:
        cfg = model.config
        itemsize = model.embed_tokens.weight.element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize

    def _slots(self, block_table: list[int], length: int) -> torch.Tensor:
        blocks = torch.tensor(block_table, dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:length]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits [n, vocab] (fp32) for the sequences that complete their known tokens this step,
        and their indices in `batch.seqs`."""
        tokens, positions, segments, sample_rows, sample_idx = [], [], [], [], []
        offset = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            tokens.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            segments.append(_Segment(offset, n, start + n, self._slots(seq.block_table, start + n), start == 0))
            offset += n
            if start + n == seq.num_tokens:
                sample_rows.append(offset - 1)
                sample_idx.append(i)
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor(positions, device=self.device)
        attention = PagedAttention(self.k_cache, self.v_cache, self.window)
        attention.prepare(segments, pos, self.device)
        hidden = self.model.hidden_states(ids, pos, cache=attention)
        if not sample_rows:
            return torch.zeros(0, self.model.config.vocab_size), []
        logits = self.model.lm_head(hidden[0, torch.tensor(sample_rows, device=self.device)])
        return logits.float(), sample_idx
