"""Training parallelism for the unmodified `Transformer`, applied from outside in a fixed order:

  1. tensor parallel: every block's linears become DTensors on the mesh's `tp` dimension, split by
     `TP_PLAN` (ColwiseParallel / RowwiseParallel); embedding, norms and LM head stay replicated;
  2. pipeline parallel: this rank keeps the layer range of its stage (`PipelineStageModel`);
  3. compile, block by block;
  4. data parallel over the mesh's `dp` dimension (the trainer's strategy: gradients all-reduced).

A TP'd or staged model keeps the whole model's parameter names, so torch.distributed.checkpoint
saves and reloads it under any other layout (TP=2 resumes at TP=1, PP=2 at PP=1, and back).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmfleet.errors import ConfigError
from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import Transformer
from lmfleet.parallel.mesh import ParallelDims
from lmfleet.parallel.tensor_parallel import TP_PLAN, check_tp


def check_parallel(config: ModelConfig, dims: ParallelDims) -> None:
    """ConfigError naming the problem when a model cannot be trained with these degrees."""
    if dims.tp > 1:
        check_tp(config, dims.tp)
        if config.num_key_value_heads % dims.tp:
            raise ConfigError(f"tp={dims.tp} does not divide num_key_value_heads={config.num_key_value_heads}: "
                              "training splits KV heads across ranks (replicated KV heads are for inference only)")
    if dims.pp > 1:
        layers = config.num_hidden_layers
        if dims.pp > layers:
            raise ConfigError(f"pp={dims.pp} is larger than num_hidden_layers={layers}: every stage needs a layer")
        if config.tie_word_embeddings:
            raise ConfigError(f"pp={dims.pp} with tie_word_embeddings=true: the embedding (first stage) and the "
                              "LM head (last stage) would share one weight across processes; "
                              "set model.tie_word_embeddings=false")


def check_micro_batches(dims: ParallelDims, grad_accum: int, schedule: str) -> None:
    """1F1B keeps every stage busy only with at least as many micro-batches as stages."""
    if dims.pp > 1 and schedule == "1f1b" and grad_accum < dims.pp:
        raise ConfigError(f"pp={dims.pp} with the 1f1b schedule needs at least {dims.pp} micro-batches per step, "
                          f"and batch.grad_accum={grad_accum} gives {grad_accum} (at {dims.dp} data-parallel "
                          "rank(s)); raise batch.grad_accum or batch.global_batch, or use --pp-schedule gpipe")


def apply_tp(model: Transformer, tp_mesh: Any) -> None:
    """Split every block's linears over `tp_mesh` as TP_PLAN says (DTensor parameters, local
    activations in between; the rowwise layers' partial sums are all-reduced in forward, and the
    replicated inputs of the colwise ones all-reduce their gradients in backward)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    tp = tp_mesh.size()
    for block in model.layers:
        parallelize_module(block, tp_mesh, {name: styles[style]() for name, style in TP_PLAN.items()})
        block.self_attn.n_heads //= tp
        block.self_attn.n_kv_heads //= tp


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """The layers of pipeline stage `stage` of `pp`: consecutive, as even as they divide."""
    return range(stage * num_layers // pp, (stage + 1) * num_layers // pp)


class PipelineStageModel(nn.Module):
    """One pipeline stage of a `Transformer`: its layer range, with the embedding on the first
    stage and the final norm and LM head on the last. Parameter names are the whole model's
    (`layers.5.mlp...` stays `layers.5.mlp...`), so checkpoints are layout-free."""

    def __init__(self, model: Transformer, layers: range):
        super().__init__()
        self.config = model.config
        self.first, self.last = layers.start == 0, layers.stop == model.config.num_hidden_layers
        self.embed_tokens = model.embed_tokens if self.first else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.rope = model.rope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] on the first stage, hidden states [B, T, H] after it; the last stage
        returns logits."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        cos, sin = self.rope(torch.arange(h.shape[1], device=h.device), h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.lm_head(self.norm(h)) if self.last else h


class PipelineForward(nn.Module):
    """Forward only, for evaluation: each stage receives the previous stage's hidden states,
    runs its layers and sends them on. The last stage returns the logits, the others None."""

    def __init__(self, stage: PipelineStageModel, group: dist.ProcessGroup):
        super().__init__()
        self.stage, self.group = stage, group
        ranks = dist.get_process_group_ranks(group)
        index = ranks.index(dist.get_rank())
        self.prev = ranks[index - 1] if index > 0 else None
        self.next = ranks[index + 1] if index + 1 < len(ranks) else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.prev is None:
            h = self.stage(ids)
        else:
            weight = next(self.stage.parameters())
            h = torch.empty(*ids.shape, self.stage.config.hidden_size, dtype=weight.dtype, device=weight.device)
            dist.recv(h, src=self.prev, group=self.group)
            h = self.stage(h)
        if self.next is None:
            return h
        dist.send(h.contiguous(), dst=self.next, group=self.group)
        return None


def parallelize(model: Transformer, dims: ParallelDims, mesh: Any, rank: int, compile: bool = False) -> nn.Module:
    """TP, then the pipeline stage, then compile, as the module docstring orders them. Returns
    the module this rank trains: `model` itself or its `PipelineStageModel`. Data parallelism
    over `mesh["dp"]` is the caller's (it owns the gradient synchronisation)."""
    check_parallel(model.config, dims)
    if dims.tp > 1:
        apply_tp(model, mesh["tp"])
    module: nn.Module = model
    if dims.pp > 1:
        stage = dims.coords(rank)["pp"]
        module = PipelineStageModel(model, stage_layers(model.config.num_hidden_layers, dims.pp, stage))
    if compile:
        for block in (module.layers.values() if isinstance(module, PipelineStageModel) else module.layers):
            block.compile()
    return module
