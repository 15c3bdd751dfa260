"""Weight pruning of the block linears: magnitude, Wanda, unstructured or N:M.

The result is an ordinary floating-point model directory whose pruned weights are exactly zero
(`config.json` records how under `pruning_config`); the engine runs it unchanged.

- magnitude: the weights of smallest |W_ij| in each layer go to zero.
- wanda: the weights of smallest |W_ij| * ||X_j|| go, compared within each output row (the
  inputs X come from calibration windows, `lmfleet/compress/calibrate.py`).
- `pattern` N:M (e.g. 2:4): in every run of M consecutive input weights of a row, the M - N of
  lowest score go, so the sparsity is exactly 1 - N/M.

With an unstructured sparsity S each layer loses exactly round(S * count) weights (magnitude,
over the layer) or round(S * in) weights of every row (Wanda).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lmfleet.compress.calibrate import INPUT_OF, InputStats, for_each_block
from lmfleet.compress.quantize import BLOCK_LINEARS, quantized_modules
from lmfleet.errors import ConfigError

PRUNE_METHODS = ("magnitude", "wanda")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M."""
    if pattern is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match or not 0 < int(match[1]) < int(match[2]) <= 64:
        raise ConfigError(f"--pattern {pattern!r} is not N:M with 0 < N < M <= 64 (e.g. 2:4)")
    return int(match[1]), int(match[2])


def check_prune(model: nn.Module, method: str, sparsity: float | None, pattern: tuple[int, int] | None) -> float:
    """The sparsity the request means (N:M implies 1 - N/M); refuses what it cannot do."""
    if method not in PRUNE_METHODS:
        raise ConfigError(f"--method {method!r} is not one of {list(PRUNE_METHODS)}")
    if quantized_modules(model):
        raise ConfigError("the model is quantized: prune the floating-point model, then quantize")
    if pattern is not None:
        n, m = pattern
        implied = 1 - n / m
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ConfigError(f"--sparsity {sparsity} contradicts --pattern {n}:{m} (which prunes exactly {implied:g})")
        for layer in model.layers:
            for name in BLOCK_LINEARS:
                in_features = layer.get_submodule(name).in_features
                if in_features % m:
                    raise ConfigError(f"--pattern {n}:{m}: M={m} does not divide the input size {in_features} of {name}")
        return implied
    if sparsity is None or not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity {sparsity} must be in [0, 1)")
    return sparsity


def prune_mask(score: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """A bool mask (True = keep) of score's shape [out, in] removing the lowest scores: N:M
    within runs of M input columns, else `sparsity` of each row (`per_row`) or of the whole."""
    out_f, in_f = score.shape
    if pattern is not None:
        n, m = pattern
        runs = score.reshape(out_f, in_f // m, m)
        drop = runs.argsort(dim=-1, stable=True)[..., : m - n]
        return torch.ones_like(runs, dtype=torch.bool).scatter_(-1, drop, False).reshape(out_f, in_f)
    if per_row:
        k = round(sparsity * in_f)
        drop = score.argsort(dim=1, stable=True)[:, :k]
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, drop, False)
    k = round(sparsity * score.numel())
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[score.flatten().argsort(stable=True)[:k]] = False
    return keep.reshape(out_f, in_f)


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sparsity: float | None = None, pattern: str | None = None,
                ids: torch.Tensor | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Prune `model`'s block linears in place; returns the `pruning_config` (method, sparsity,
    pattern, and the fraction of zero weights actually reached)."""
    nm = parse_pattern(pattern)
    target = check_prune(model, method, sparsity, nm)
    if method == "wanda" and ids is None:
        raise ConfigError("--method wanda needs calibration data: give --data")
    model.requires_grad_(False)
    zero = total = 0

    def prune_block(index: int, block: nn.Module, inputs: dict[str, InputStats] | None) -> None:
        nonlocal zero, total
        for name in BLOCK_LINEARS:
            weight = block.get_submodule(name).weight
            score = weight.abs().float()
            if inputs is not None:
                score = score * inputs[INPUT_OF[name]].norms[None, :]
            mask = prune_mask(score, target, nm, per_row=method == "wanda")
            weight.mul_(mask.to(weight.dtype))
            zero += int((~mask).sum())
            total += mask.numel()
        if progress is not None:
            progress(index + 1, len(model.layers))

    if method == "wanda":
        for_each_block(model, ids, prune_block)
    else:
        for index, block in enumerate(model.layers):
            prune_block(index, block, None)
    return {"method": method, "sparsity": target, "pattern": pattern if nm is None else f"{nm[0]}:{nm[1]}",
            "achieved": zero / max(total, 1), "modules": "block linears"}
