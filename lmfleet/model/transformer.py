"""A decoder-only transformer of the Llama / Qwen2 / Mistral family, in plain PyTorch.

Module names follow Hugging Face's (`self_attn.q_proj`, `mlp.gate_proj`, ...) without the
`model.` prefix, so checkpoint mapping is a prefix and nothing more. Parallelism, paging and
serving wrap this module from outside: attention over a cache is delegated to a `cache` object
passed to `forward`, which the model never looks inside.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.model.config import ModelConfig


class AttentionCache(Protocol):
    """What `Transformer.forward(..., cache=)` needs: attention of new q/k/v against cached keys."""

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, H, T, D]; k, v: [B, KVH, T, D] for the new tokens. Returns [B, H, T, D]."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op; below fp32, normalise in fp32 and cast back before the scale, as the
        # reference implementation does.
        if x.dtype == torch.float32 or x.dtype == torch.float64:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies for RoPE, with linear or Llama-3 scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif cfg.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. The frequencies stay fp32 whatever the model's dtype:
    they are a plain attribute, not a buffer, so `model.to(torch.bfloat16)` leaves them alone.
    `precompute` (inference) stores cos|sin of every position once, so a step looks them up."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inv_freq = rope_inv_freq(cfg, torch.device("cpu"))
        self.max_positions = cfg.max_position_embeddings
        self.table: torch.Tensor | None = None  # [max_positions, 2 * head_dim]: cos | sin

    def _cos_sin(self, positions: torch.Tensor) -> torch.Tensor:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq  # [..., T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return torch.cat((emb.cos(), emb.sin()), dim=-1)

    def precompute(self, device: torch.device, dtype: torch.dtype, positions: int | None = None) -> None:
        """The cos/sin table of the first `positions` positions (default: all the model has): the
        engine's max_model_len, which no sequence passes."""
        self.table = self._cos_sin(torch.arange(min(positions or self.max_positions, self.max_positions),
                                                device=device)).to(dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.table
        if table is None or table.dtype != dtype or table.device != positions.device:
            table = self._cos_sin(positions).to(dtype)
        else:
            table = table[positions]
        cos, sin = table.chunk(2, dim=-1)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean [Tq, Tk] (or batched) mask: True where a query may attend to a key."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return allowed


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """Self-attention of a whole sequence (no cache): causal, optionally windowed, GQA-aware."""
    seq_len = q.shape[-2]
    if window is None or seq_len <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    pos = torch.arange(seq_len, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(pos, pos, window), enable_gqa=True)


def _concat_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of the given ones' outputs (a layer type of
    another kind, such as a quantized one, concatenates itself)."""
    if not isinstance(linears[0], nn.Linear):
        return type(linears[0]).concat(linears)
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = linears[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([lin.bias.detach() for lin in linears]), requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.sliding_window
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)
        self.qkv_proj: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """One q|k|v matrix instead of three (fewer, larger matmuls); inference only."""
        self.qkv_proj = _concat_linears([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: AttentionCache | None = None) -> torch.Tensor:
        bsz, seq_len, _ = x.shape
        if self.qkv_proj is not None:
            # Rotate q and k together: the same element-wise operations, half the calls.
            n_qk = self.n_heads + self.n_kv_heads
            qkv = self.qkv_proj(x)
            qk = qkv[..., :n_qk * self.head_dim].unflatten(-1, (n_qk, self.head_dim)).transpose(1, 2)
            q, k = apply_rope(qk, cos, sin).split([self.n_heads, self.n_kv_heads], dim=1)
            v = qkv[..., n_qk * self.head_dim:]
        else:
            q = self.q_proj(x).view(bsz, seq_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
            q, k, v = apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.v_proj(x)
        v = v.view(bsz, seq_len, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is None:
            out = causal_attention(q, k, v, self.window)
        else:
            out = cache.attend(self.layer_idx, q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq_len, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.gate_up_proj: nn.Linear | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """One gate|up matrix instead of two; inference only."""
        self.gate_up_proj = _concat_linears([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: AttentionCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """`model(input_ids)` -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = RotaryEmbedding(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Random initialisation: N(0, initializer_range), residual projections scaled by depth."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                p.copy_(torch.randn(p.shape, generator=gen) * s)

    def fuse_projections(self) -> Transformer:
        """Concatenate q|k|v and gate|up into single matrices in every layer: same outputs, fewer and
        larger matmuls. For inference copies only; the fused model's state_dict is no longer in the
        Hugging Face layout."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
        return self

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      cache: AttentionCache | None = None) -> torch.Tensor:
        """Final normalised hidden states [B, T, hidden]; `positions` defaults to 0..T-1."""
        h = self.embed_tokens(input_ids)
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        cos, sin = self.rope(positions, h.dtype)
        if cos.dim() == 3:  # per-sequence positions [B, T, D] -> broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: AttentionCache | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, positions, cache))


def build_model(config: ModelConfig, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Transformer:
    """A freshly initialised model (deterministic in `seed`)."""
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(seed)
    return model.to(device=device, dtype=dtype)
