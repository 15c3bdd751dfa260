"""Perplexity on a corpus split: the yardstick for training, quantization, pruning and distillation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lmfleet.data.corpus import Corpus
from lmfleet.data.loader import eval_windows


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, corpus: Corpus, seq_len: int = 256, max_tokens: int = 65536,
                        split: str = "val", rank: int = 0, world_size: int = 1,
                        all_reduce: Callable[[torch.Tensor], None] | None = None,
                        autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Mean next-token loss and perplexity over the first `max_tokens` targets of a split.

    With `world_size` > 1 each rank scores every world_size-th window and `all_reduce` sums the
    totals (every rank must call it, e.g. under FSDP where the forward itself is collective). A
    `model` that returns None on this rank scores nothing here.
    """
    device = next(model.parameters()).device
    windows = eval_windows(corpus, seq_len, max_tokens, split)
    # Ranks take turns; every rank runs the same number of forwards (collective-safe).
    rounds = math.ceil(len(windows) / world_size)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for i in range(rounds):
        index = i * world_size + rank
        window = windows[index] if index < len(windows) else windows[0]
        ids = torch.from_numpy(window).to(device)[None]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(ids[:, :-1])
        if logits is None:  # a rank that only passes activations on (a pipeline's earlier stages)
            continue
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        if index < len(windows):
            totals += torch.stack([loss.double(), torch.tensor(ids.shape[1] - 1, dtype=torch.float64,
                                                               device=device)])
    if all_reduce is not None:
        all_reduce(totals)
    model.train(was_training)
    loss_sum, tokens = totals.tolist()
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700)), "tokens": int(tokens)}
