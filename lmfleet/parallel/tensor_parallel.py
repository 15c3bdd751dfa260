"""Tensor parallelism for the unmodified `Transformer`, applied from outside.

`TP_PLAN` says, per linear layer of a block, how its weight is split across the TP ranks:

  colwise   output features split: q/k/v by attention heads, gate/up by intermediate features.
            The input is whole on every rank; so is nothing after it until the next rowwise.
  rowwise   input features split (o, down): each rank multiplies its slice of the features, an
            all-reduce sums the partial outputs, the bias is added once after the sum.

The LM head is split by vocabulary when the vocabulary divides by the TP degree (each rank's
logits are gathered), replicated otherwise; the embedding and the norms are replicated. KV heads
are split across ranks; when there are fewer KV heads than ranks, each KV head is replicated on
`tp / kv_heads` consecutive ranks (the ones whose query heads use it), as vLLM does.

`shard_for_inference` slices an ordinary model in place for one rank; the engine then fuses q|k|v
and gate|up and picks its linear methods over the local slices as it does for one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lmfleet.errors import ConfigError
from lmfleet.model.config import ModelConfig

TP_PLAN: dict[str, str] = {
    "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


@dataclass(frozen=True)
class TPLayout:
    """What rank `rank` of `tp` holds of a model with `config`."""

    tp: int
    rank: int
    heads: int  # query heads on this rank
    kv_heads: int  # KV heads on this rank (1 when replicated)
    first_head: int  # this rank's first query head
    first_kv_head: int
    intermediate: int  # MLP features on this rank
    vocab_parallel: bool  # the LM head split by vocabulary (else replicated)
    kv_heads_total: int  # KV heads of the whole model

    @property
    def kv_replicated(self) -> bool:
        return self.kv_heads * self.tp > self.kv_heads_total


def check_tp(config: ModelConfig, tp: int) -> None:
    """ConfigError naming the problem when `config` cannot be split `tp` ways."""
    if tp < 1:
        raise ConfigError(f"tensor_parallel_size={tp} must be >= 1")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % tp:
        raise ConfigError(f"tensor_parallel_size={tp} does not divide num_attention_heads={heads}")
    if kv % tp and tp % kv:
        raise ConfigError(f"tensor_parallel_size={tp} and num_key_value_heads={kv}: one must divide the other "
                          "(KV heads are split across ranks, or each replicated on tp/kv ranks)")
    if config.intermediate_size % tp:
        raise ConfigError(f"tensor_parallel_size={tp} does not divide intermediate_size={config.intermediate_size}")


def tp_layout(config: ModelConfig, tp: int, rank: int) -> TPLayout:
    check_tp(config, tp)
    if not 0 <= rank < tp:
        raise ConfigError(f"rank {rank} is outside tensor_parallel_size={tp}")
    heads, kv = config.num_attention_heads // tp, config.num_key_value_heads
    if kv >= tp:
        kv_here, first_kv = kv // tp, rank * (kv // tp)
    else:  # each KV head on tp // kv consecutive ranks: those whose query heads read it
        kv_here, first_kv = 1, rank // (tp // kv)
    return TPLayout(tp, rank, heads, kv_here, rank * heads, first_kv, config.intermediate_size // tp,
                    config.vocab_size % tp == 0, kv)


class RowParallelLinear(nn.Module):
    """A rowwise slice: `inner` multiplies this rank's input features (no bias), an all-reduce
    over `group` sums the ranks' partial outputs, then the bias is added once."""

    def __init__(self, inner: nn.Linear, bias: torch.Tensor | None, group: dist.ProcessGroup | None):
        super().__init__()
        self.inner = inner
        self.register_buffer("bias", bias, persistent=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        dist.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


class VocabParallelHead(nn.Module):
    """The LM head split by vocabulary: each rank's logits for its slice, gathered in rank order."""

    def __init__(self, inner: nn.Linear, tp: int, group: dist.ProcessGroup | None):
        super().__init__()
        self.inner, self.tp, self.group = inner, tp, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = self.inner(x).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (copies: the slices must not pin the whole)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear


def _rows(linear: nn.Linear, start: int, count: int) -> nn.Linear:
    bias = None if linear.bias is None else linear.bias[start:start + count]
    return _linear(linear.weight[start:start + count], bias)


def _feature_range(name: str, layout: TPLayout, head_dim: int) -> tuple[int, int]:
    """(first, count) of the features of `name` (a TP_PLAN entry) on this rank: its output
    features when colwise, its input features when rowwise."""
    if name.endswith("q_proj") or name.endswith("o_proj"):
        return layout.first_head * head_dim, layout.heads * head_dim
    if name.endswith(("k_proj", "v_proj")):
        return layout.first_kv_head * head_dim, layout.kv_heads * head_dim
    return layout.rank * layout.intermediate, layout.intermediate  # gate, up, down


@torch.no_grad()
def shard_for_inference(model: nn.Module, tp: int, rank: int, group: dist.ProcessGroup | None = None) -> TPLayout:
    """Slice `model` (an unfused `Transformer`, the engine's own copy) in place to what TP rank
    `rank` of `tp` holds, following `TP_PLAN`; returns the layout. With tp == 1 nothing changes."""
    layout = tp_layout(model.config, tp, rank)
    if tp == 1:
        return layout
    d = model.config.head_dim
    for block in model.layers:
        if block.self_attn.qkv_proj is not None or block.mlp.gate_up_proj is not None:
            raise ValueError("shard_for_inference needs the unfused model (shard first, then fuse)")
        for name, style in TP_PLAN.items():
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            linear: nn.Linear = getattr(parent, child)
            first, count = _feature_range(name, layout, d)
            if style == "colwise":
                setattr(parent, child, _rows(linear, first, count))
            else:
                sliced = _linear(linear.weight[:, first:first + count], None)
                setattr(parent, child, RowParallelLinear(sliced, linear.bias, group))
        block.self_attn.n_heads, block.self_attn.n_kv_heads = layout.heads, layout.kv_heads
    if layout.vocab_parallel:
        per_rank = model.config.vocab_size // tp
        model.lm_head = VocabParallelHead(_rows(model.lm_head, rank * per_rank, per_rank), tp, group)
    return layout


def tp_memory(config: ModelConfig, tp: int, dtype_bytes: int, kv_tokens: int) -> list[dict[str, int]]:
    """Per-rank memory of the engine's tensor-parallel layout: parameters (counted on the model
    `shard_for_inference` actually produces, on the meta device) and the KV cache for `kv_tokens`
    tokens. One dict per rank: params, weight_bytes, kv_bytes_per_token, kv_bytes."""
    from lmfleet.model.transformer import Transformer

    ranks = []
    for rank in range(tp):
        with torch.device("meta"):
            model = Transformer(config)
        layout = shard_for_inference(model, tp, rank)
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        params = sum(t.numel() for t in tensors.values())
        per_token = 2 * config.num_hidden_layers * layout.kv_heads * config.head_dim * dtype_bytes
        ranks.append({"rank": rank, "params": params, "weight_bytes": params * dtype_bytes,
                      "kv_bytes_per_token": per_token, "kv_bytes": per_token * kv_tokens})
    return ranks
