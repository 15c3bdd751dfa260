"""One forward over a flat batch of mixed prefill chunks and decodes, attending over the paged cache.

The model sees `input_ids [1, N]` with per-token positions; its attention layers hand q/k/v to a
`PagedAttention` context (`engine/attention.py`). On CUDA, a step made only of decodes replays a
CUDA graph instead (`engine/decode_graphs.py`). On CPU, linear layers are swapped for the fastest
form of their weights.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmfleet.engine.attention import PagedAttention, PrefillSegment
from lmfleet.engine.decode_graphs import DecodeGraphs
from lmfleet.engine.scheduler import ScheduledBatch
from lmfleet.model.transformer import Transformer


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
    """Runs the engine's copy of the model over the paged cache. `cuda_graphs`: decode-only steps of
    up to `max_num_seqs` sequences replay CUDA graphs (CUDA only)."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_num_seqs: int = 64,
                 max_model_len: int | None = None, cuda_graphs: bool = False):
        model.fuse_projections()
        if model.embed_tokens.weight.device.type == "cpu":
            prepare_cpu_linears(model)
        self.model = model
        self.block_size = block_size
        cfg = model.config
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        # One block more than the pool hands out: the scratch block padding rows write to.
        shape = (cfg.num_hidden_layers, (num_blocks + 1) * block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.dtype)
        self.scratch_slot = num_blocks * block_size
        # On CPU, decodes attend in up to 4 groups of similar context length (less padding to gather
        # and attend over); on CUDA, in one call (the host is the bottleneck there).
        self.max_decode_groups = 4 if self.device.type == "cpu" else 1
        self.window = cfg.sliding_window
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device}")
            self.graphs = DecodeGraphs(self, max_num_seqs, max_model_len or cfg.max_position_embeddings, capture=True)

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int) -> int:
        cfg = model.config
        itemsize = model.embed_tokens.weight.element_size()
        return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * itemsize

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Logits [n, vocab] (fp32) for the sequences that complete their known tokens this step,
        and their indices in `batch.seqs`."""
        if self.graphs is not None and self.graphs.fits(batch):
            try:
                logits = self.graphs.run(batch)
            except RuntimeError as exc:  # an operation this build cannot capture, no memory left, ...
                warnings.warn(f"CUDA graph capture failed ({exc}); decode steps run eagerly from now on",
                              RuntimeWarning, stacklevel=2)
                self.graphs = None
            else:
                rows = [i for i, seq in enumerate(batch.seqs) if seq.num_computed_tokens + 1 == seq.num_tokens]
                return logits[rows].float(), rows
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        prefills, prefill_tables = [], []
        decode_rows, decode_tables, decode_context = [], [], []
        sample_rows, sample_idx = [], []
        offset = 0
        order = range(len(batch.seqs))
        if self.max_decode_groups > 1:  # decodes in ascending context order, to group them
            order = sorted(order, key=lambda i: batch.seqs[i].num_computed_tokens)
        for i in order:
            seq, n = batch.seqs[i], batch.num_new_tokens[i]
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
                prefills.append(PrefillSegment(offset, n, start + n, start == 0))
                prefill_tables.append(table)
            offset += n
            if start + n == seq.num_tokens:
                sample_rows.append(offset - 1)
                sample_idx.append(i)
        ids = torch.tensor([tokens], device=self.device)
        pos = torch.tensor(positions, device=self.device)
        attention = PagedAttention(self.k_cache, self.v_cache, self.window, bs, slot_mapping, prefills,
                                   prefill_tables, decode_rows, decode_tables, decode_context,
                                   self.max_decode_groups)
        hidden = self.model.hidden_states(ids, pos, cache=attention)
        if not sample_rows:
            return torch.zeros(0, self.model.config.vocab_size), []
        logits = self.model.lm_head(hidden[0, torch.tensor(sample_rows, device=self.device)])
        return logits.float(), sample_idx
