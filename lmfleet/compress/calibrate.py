"""Compression that looks at activations: GPTQ and AWQ for int4, Wanda for pruning.

All three run the same loop (`for_each_block`): calibration token windows go through the model
one block at a time; hooks capture the inputs of the block's linear layers; the method rewrites
the block; the rewritten block's outputs become the next block's inputs, so later blocks are
calibrated on what they will really see.

- GPTQ (Frantar et al., 2022) quantizes a layer's input columns one at a time and spreads each
  column's rounding error over the columns not yet quantized, weighted by the inverse of the
  Hessian `H = X^T X` of the layer's inputs.
- AWQ (Lin et al., 2023) scales each input channel by `s = mean|x|^alpha` before rounding (the
  salient channels get finer steps), folds `1/s` into the layer that produces the input (an
  RMSNorm's weight or the previous linear's rows), and picks alpha on a grid by the output error
  on the calibration inputs.
- Wanda (Sun et al., 2023) scores weights by `|W_ij| * ||X_j||`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmfleet.compress.quantize import (
    BLOCK_LINEARS,
    Int4QuantizedLinear,
    check_quantize,
    dequantize_int4,
    int4_params,
    int4_round,
    quantize_int4,
    replace_linear,
    untie_head,
)
from lmfleet.errors import ConfigError

# Each block linear's input is captured once, at the first layer that reads it.
INPUT_OF = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
            "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
            "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
CAPTURED = sorted(set(INPUT_OF.values()))
QK = ("self_attn.q_proj", "self_attn.k_proj")
MIN_SAMPLES = 1


def calibration_ids(data: str | Path, samples: int, seq_len: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """`samples` distinct, non-overlapping windows of `seq_len` tokens drawn (seeded) from the
    corpus's train split: int64 [samples, seq_len]."""
    from lmfleet.data.corpus import Corpus

    if samples < MIN_SAMPLES or seq_len < 2:
        raise ConfigError(f"--samples={samples} and --seq-len={seq_len} must be at least {MIN_SAMPLES} and 2")
    corpus = Corpus(data)
    if corpus.vocab_size > vocab_size:
        raise ConfigError(f"corpus {data} has a vocabulary of {corpus.vocab_size}, larger than the model's "
                          f"{vocab_size}: it was tokenized for another model")
    tokens = corpus.tokens("train")
    windows = len(tokens) // seq_len
    if windows < samples:
        raise ConfigError(f"the calibration set is too small: the train split of {data} holds {len(tokens):,} "
                          f"tokens, {windows} windows of {seq_len}; --samples {samples} needs "
                          f"{samples * seq_len:,} tokens (lower --samples or --seq-len)")
    starts = np.sort(np.random.default_rng(seed).choice(windows, size=samples, replace=False)) * seq_len
    return torch.from_numpy(np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts]))


class InputStats:
    """What the methods need of one layer input's calibration activations, gathered as they stream
    past instead of kept whole: per-channel sums of |x| and x^2, X^T X for GPTQ (`hessian`), and
    an evenly strided sample of at most `max_rows` rows (AWQ's error estimates)."""

    def __init__(self, total_rows: int, hessian: bool, max_rows: int = 4096):
        self.stride = max(1, math.ceil(total_rows / max_rows))
        self.want_hessian = hessian
        self.count = 0
        self.parts: list[torch.Tensor] = []
        self.abs_sum = self.sq_sum = self.xtx = None

    @classmethod
    def of(cls, x: torch.Tensor, hessian: bool) -> InputStats:
        stats = cls(len(x), hessian)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:
            width = x.shape[1]
            self.abs_sum = torch.zeros(width, dtype=torch.float64)
            self.sq_sum = torch.zeros(width, dtype=torch.float64)
            if self.want_hessian:
                self.xtx = torch.zeros(width, width, dtype=torch.float64)
        self.parts.append(x[(-self.count) % self.stride::self.stride].clone())
        self.count += len(x)
        self.abs_sum += x.abs().sum(dim=0).double()
        self.sq_sum += x.pow(2).sum(dim=0).double()
        if self.xtx is not None:
            self.xtx += (x.T @ x).double()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.parts)

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def norms(self) -> torch.Tensor:
        """||X_j||_2 over every calibration token, per input channel (Wanda's statistic)."""
        return self.sq_sum.sqrt().float()

    @property
    def hessian(self) -> torch.Tensor:
        return self.xtx / max(self.count, 1)


def _capture(into: InputStats) -> Callable[..., None]:
    def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        into.add(args[0])
    return hook


@torch.no_grad()
def for_each_block(model: nn.Module, ids: torch.Tensor,
                   handle: Callable[[int, nn.Module, dict[str, InputStats]], None],
                   batch_size: int = 8, hessian: bool = False) -> torch.Tensor:
    """Run `ids` [N, T] through the blocks in order. For each block, `handle(index, block, stats)`
    gets what was gathered of the inputs of the block's linears (`stats[name]`, keyed as in
    `CAPTURED`; X^T X too with `hessian`) and may rewrite the block in place; its outputs then
    feed the next block. Returns the last block's outputs [N*T, hidden] (before the final norm)."""
    hidden = [model.embed_tokens(ids[i:i + batch_size]) for i in range(0, len(ids), batch_size)]
    cos, sin = model.rope(torch.arange(ids.shape[1], device=ids.device), hidden[0].dtype)
    for index, block in enumerate(model.layers):
        stats = {name: InputStats(ids.numel(), hessian) for name in CAPTURED}
        hooks = [block.get_submodule(name).register_forward_hook(_capture(stats[name])) for name in CAPTURED]
        try:
            for h in hidden:
                block(h, cos, sin)
        finally:
            for hook in hooks:
                hook.remove()
        handle(index, block, stats)
        hidden = [block(h, cos, sin) for h in hidden]
    return torch.cat([h.reshape(-1, h.shape[-1]) for h in hidden]).float()


# ---- GPTQ ----------------------------------------------------------------------------------------

def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01,
              block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ for one layer: (q uint8 [out, in], scales [out, in/group], zeros uint8 [out, in/group])
    in the layout of `quantize_int4`, chosen to keep `x @ W^T` close for inputs whose
    `hessian` [in, in] is `X^T X / n`.
    Each group's scale and zero come from the group's weights as updated by the errors of the
    columns before it."""
    out_f, in_f = weight.shape
    w = weight.detach().float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # an input that is always zero: its weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = None
    for attempt in range(4):  # more damping where X^T X is ill-conditioned
        damped = h + torch.eye(in_f, dtype=h.dtype) * (damp * 10 ** attempt * torch.diag(h).mean())
        try:
            u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True).float()
            break
        except torch.linalg.LinAlgError:
            continue
    if u is None or not torch.isfinite(u).all():
        raise ConfigError("GPTQ: the calibration activations give no usable Hessian (not finite or singular even "
                          "with 10x-1000x damping); check the model and the calibration data")
    q = torch.zeros(out_f, in_f)
    groups = in_f // group_size
    scales, zeros = torch.zeros(out_f, groups), torch.zeros(out_f, groups)
    block_size = max(block_size, group_size)  # a group never straddles two blocks
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        errors = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = i1 + j
            if col % group_size == 0:
                g = col // group_size
                scales[:, g], zeros[:, g] = int4_params(w1[:, j:j + group_size])
            scale, zero = scales[:, col // group_size], zeros[:, col // group_size]
            column = w1[:, j]
            q[:, col] = int4_round(column, scale, zero)
            err = (column - scale * (q[:, col] - zero)) / u1[j, j]
            w1[:, j:] -= err[:, None] * u1[j, j:][None, :]
            errors[:, j] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return q.to(torch.uint8), scales, zeros.to(torch.uint8)


# ---- AWQ -----------------------------------------------------------------------------------------

def _int4_dequantized(weight: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    return dequantize_int4(*quantize_int4(weight, group_size, clip), group_size)


def awq_scale(weights: list[torch.Tensor], x: torch.Tensor, magnitude: torch.Tensor, group_size: int,
              grid: int = 20, tie: Callable[[torch.Tensor], torch.Tensor] | None = None,
              max_rows: int = 4096) -> torch.Tensor:
    """The per-input-channel scale s [in] (weights multiplied by s, inputs divided by it) that
    keeps `x @ W^T` closest after rounding W*s to int4, over s = mean|x|^alpha for alpha on a grid
    in [0, 1) (alpha = 0 is plain rounding); `magnitude` is mean|x| over all calibration tokens,
    `x` a sample of the inputs. `tie` makes s equal where the producer of the input
    can only scale channels together (heads sharing a KV head)."""
    if len(x) > max_rows:
        x = x[torch.linspace(0, len(x) - 1, max_rows).long()]
    w = torch.cat([t.detach().float() for t in weights])
    reference = x @ w.T
    best, best_loss = torch.ones_like(magnitude), math.inf
    for k in range(grid):
        s = magnitude.pow(k / grid).clamp(min=1e-4)
        if tie is not None:
            s = tie(s)
        s = s / (s.max() * s.min()).sqrt()
        loss = ((x @ (_int4_dequantized(w * s, group_size) / s).T - reference) ** 2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


def awq_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 10,
             max_rows: int = 512) -> torch.Tensor:
    """AWQ's range clipping: for each row and group, the shrink factor of the int4 range in
    {1, 0.95, ..., 1 - (grid - 1) * 0.05} that gives the smallest error of that group's share of
    `x @ W^T` on the calibration inputs (a few outliers clipped, finer steps for the rest)."""
    if len(x) > max_rows:
        x = x[torch.linspace(0, len(x) - 1, max_rows).long()]
    out_f, in_f = weight.shape
    w = weight.detach().float()
    xg = x.reshape(len(x), in_f // group_size, group_size)
    best = torch.ones(out_f, in_f // group_size)
    rows = max(1, (1 << 24) // max(len(x) * (in_f // group_size), 1))  # bounds the einsum's [n, rows, groups]
    for r0 in range(0, out_f, rows):
        part, chosen = w[r0:r0 + rows], best[r0:r0 + rows]
        best_err = torch.full_like(chosen, math.inf)
        for k in range(grid):
            ratio = torch.full_like(chosen, 1 - 0.05 * k)
            diff = (_int4_dequantized(part, group_size, ratio) - part).reshape(len(part), -1, group_size)
            err = torch.einsum("ngk,ogk->nog", xg, diff).pow(2).mean(dim=0)  # [rows, groups]
            better = err < best_err
            chosen.copy_(torch.where(better, ratio, chosen))
            best_err = torch.where(better, err, best_err)
    return best


def _kv_tie(n_heads: int, n_kv_heads: int, head_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """For o_proj's input (the attention output, n_heads x head_dim): heads that read the same KV
    head share its v_proj rows, so their channels must share one scale."""
    def tie(s: torch.Tensor) -> torch.Tensor:
        shared = s.reshape(n_kv_heads, n_heads // n_kv_heads, head_dim).mean(dim=1, keepdim=True)
        return shared.expand(-1, n_heads // n_kv_heads, -1).reshape(-1)
    return tie


def _xm(stats: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    return stats.sample, stats.mean_abs


@torch.no_grad()
def awq_fold(block: nn.Module, inputs: dict[str, InputStats], group_size: int) -> dict[str, torch.Tensor]:
    """Scale the block's linears' input channels (AWQ) and fold the inverse scales into whatever
    produces those inputs; the block's floating-point outputs are unchanged. Returns the scales,
    keyed like `inputs` (the layers now see their inputs divided by `scales[key]`)."""
    scales = {}
    attn, mlp = block.self_attn, block.mlp

    def scale_inputs(linears: list[nn.Linear], s: torch.Tensor) -> None:
        for linear in linears:
            linear.weight.mul_(s.to(linear.weight.dtype)[None, :])

    qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
    s = scales["self_attn.q_proj"] = awq_scale([lin.weight for lin in qkv], *_xm(inputs["self_attn.q_proj"]), group_size)
    block.input_layernorm.weight.div_(s.to(block.input_layernorm.weight.dtype))
    scale_inputs(qkv, s)

    tie = _kv_tie(attn.n_heads, attn.n_kv_heads, attn.head_dim)
    s = scales["self_attn.o_proj"] = awq_scale([attn.o_proj.weight], *_xm(inputs["self_attn.o_proj"]), group_size,
                                                    tie=tie)
    per_kv = s.reshape(attn.n_kv_heads, -1, attn.head_dim)[:, 0].reshape(-1)  # equal within a group
    attn.v_proj.weight.div_(per_kv.to(attn.v_proj.weight.dtype)[:, None])
    if attn.v_proj.bias is not None:
        attn.v_proj.bias.div_(per_kv.to(attn.v_proj.bias.dtype))
    scale_inputs([attn.o_proj], s)

    s = scales["mlp.gate_proj"] = awq_scale([mlp.gate_proj.weight, mlp.up_proj.weight],
                                            *_xm(inputs["mlp.gate_proj"]), group_size)
    block.post_attention_layernorm.weight.div_(s.to(block.post_attention_layernorm.weight.dtype))
    scale_inputs([mlp.gate_proj, mlp.up_proj], s)

    s = scales["mlp.down_proj"] = awq_scale([mlp.down_proj.weight], *_xm(inputs["mlp.down_proj"]), group_size)
    mlp.up_proj.weight.div_(s.to(mlp.up_proj.weight.dtype)[:, None])
    if mlp.up_proj.bias is not None:
        mlp.up_proj.bias.div_(s.to(mlp.up_proj.bias.dtype))
    scale_inputs([mlp.down_proj], s)
    return scales


# ---- int4 with calibration -----------------------------------------------------------------------

def _int4_layer(linear: nn.Linear, stats: InputStats, group_size: int, calibration: str,
                scale: torch.Tensor | None = None, clip: bool = True) -> Int4QuantizedLinear:
    """GPTQ from the input's Hessian, or AWQ's clipped rounding of the (already scaled) weights
    on the input sample divided by `scale`; q and k are not clipped (their error passes through
    the softmax, which the output error here does not see)."""
    if calibration == "gptq":
        quantized = gptq_int4(linear.weight, stats.hessian, group_size)
    elif clip:
        x = stats.sample if scale is None else stats.sample / scale
        quantized = quantize_int4(linear.weight, group_size, awq_clip(linear.weight, x, group_size))
    else:
        quantized = quantize_int4(linear.weight, group_size)
    return Int4QuantizedLinear.from_quantized(linear, *quantized, group_size)


@torch.no_grad()
def quantize_calibrated(model: nn.Module, ids: torch.Tensor, calibration: str, group_size: int,
                        include_head: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> nn.Module:
    """int4 with GPTQ or AWQ calibration on the token windows `ids`, in place; returns the model."""
    if calibration not in ("gptq", "awq"):
        raise ConfigError(f"--calibrate {calibration!r} is not one of ['gptq', 'awq'] (or 'none')")
    check_quantize(model, "int4", group_size, include_head)
    if include_head:
        untie_head(model)
    model.requires_grad_(False)

    def handle(index: int, block: nn.Module, inputs: dict[str, InputStats]) -> None:
        scales = awq_fold(block, inputs, group_size) if calibration == "awq" else {}
        for name in BLOCK_LINEARS:
            key = INPUT_OF[name]
            replace_linear(block, name, _int4_layer(block.get_submodule(name), inputs[key], group_size, calibration,
                                                    scales.get(key), clip=name not in QK))
        if progress is not None:
            progress(index + 1, len(model.layers) + int(include_head))

    last = for_each_block(model, ids, handle, hessian=calibration == "gptq")
    if include_head:
        stats = InputStats.of(model.norm(last), hessian=calibration == "gptq")
        del last
        s = None
        if calibration == "awq":
            s = awq_scale([model.lm_head.weight], *_xm(stats), group_size)
            model.norm.weight.div_(s.to(model.norm.weight.dtype))
            model.lm_head.weight.mul_(s.to(model.lm_head.weight.dtype)[None, :])
        model.lm_head = _int4_layer(model.lm_head, stats, group_size, calibration, s)
        if progress is not None:
            progress(len(model.layers) + 1, len(model.layers) + 1)  # the head
    return model
