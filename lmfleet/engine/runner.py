"""Executes one step from its metadata: a flat batch of mixed prefill chunks and decodes, attending
over the paged cache.

The model sees `input_ids [1, N]` with per-token positions; its attention layers hand q/k/v to a
`PagedAttention` context (`engine/attention.py`). On CUDA, a step made only of decodes replays a
CUDA graph instead (`engine/decode_graphs.py`). Linear layers take the form `linear_method` says
(`engine/linear.py`). Nothing here reads `Sequence` objects: `engine/step.py` builds the metadata.
"""

from __future__ import annotations

import torch

from lmfleet.engine.attention import PagedAttention, step_tensors
from lmfleet.engine.decode_graphs import DecodeGraphs
from lmfleet.engine.linear import apply_linear_method
from lmfleet.engine.step import StepMetadata
from lmfleet.model.transformer import Transformer


class ModelRunner:
    """Runs the engine's copy of the model over the paged cache. `cuda_graphs`: decode-only steps of
    up to `max_num_seqs` sequences replay CUDA graphs (CUDA only), all captured by `capture_graphs()`."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, max_num_seqs: int = 64,
                 max_model_len: int | None = None, cuda_graphs: bool = False, linear_method: str = "auto",
                 kv_heads: int | None = None):
        model.fuse_projections()
        apply_linear_method(model, linear_method, max_rows=max_num_seqs)
        self.model = model
        self.block_size = block_size
        cfg = model.config
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        model.rope.precompute(self.device, self.dtype, max_model_len)  # steps look cos/sin up, not compute them
        # One block more than the pool hands out: the scratch block padding rows write to.
        # `kv_heads`: this rank's KV heads under tensor parallelism (all of them otherwise).
        shape = (cfg.num_hidden_layers, (num_blocks + 1) * block_size, kv_heads or cfg.num_key_value_heads,
                 cfg.head_dim)
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

    @property
    def sort_decodes(self) -> bool:
        """Whether step metadata should list sequences in ascending context order (decode groups)."""
        return self.max_decode_groups > 1

    @staticmethod
    def bytes_per_block(model: Transformer, block_size: int, kv_heads: int | None = None) -> int:
        cfg = model.config
        itemsize = model.embed_tokens.weight.element_size()
        return 2 * cfg.num_hidden_layers * block_size * (kv_heads or cfg.num_key_value_heads) * cfg.head_dim * itemsize

    def capture_graphs(self) -> None:
        """Capture every decode graph now (start-up), not on first use."""
        if self.graphs is not None:
            self.graphs.capture_all()

    @torch.inference_mode()
    def execute(self, meta: StepMetadata) -> torch.Tensor:
        """Logits [len(meta.sampled), vocab] (fp32) of the sequences that complete their known tokens."""
        if self.graphs is not None and self.graphs.fits(meta):
            logits = self.graphs.run(meta)
            if logits is not None:  # None: that shape could not be captured; run it eagerly
                return logits[meta.sampled].float()
        step = step_tensors(meta, self.block_size, self.window, self.device, self.max_decode_groups)
        attention = PagedAttention(self.k_cache, self.v_cache, self.window, step)
        hidden = self.model.hidden_states(step.input_ids[None], step.positions, cache=attention)
        if not meta.sampled:
            return torch.zeros(0, self.model.config.vocab_size, device=self.device)
        return self.model.lm_head(hidden[0, step.sample_rows]).float()
