"""Next-token sampling over a batch of logit rows, on the logits' device, each row with its own
settings: temperature, top-k, top-p, min-p, and its own generator when seeded.

A draw is an exponential race (argmax p / E with E ~ Exp(1), the same law as a multinomial draw),
so a seeded row's token depends only on its own logits and its generator, never on the batch.
The engine's sampler (`lmfleet.engine.sampler`) and `lmfleet.model.generate` both draw through
`sample_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k (0: off), top-p (nucleus; 1: off) and min-p (0: off) exclude, in
    that order, for rows [B, vocab] with per-row settings [B]. Top-p keeps the smallest set of the
    most likely tokens whose probability (after top-k) reaches p; min-p drops tokens less likely
    than min_p times the most likely one."""
    vocab = logits.shape[-1]
    if bool(((top_k > 0) & (top_k < vocab)).any()) or bool((top_p < 1).any()):
        ordered, order = logits.sort(-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        keep_k = torch.where(top_k > 0, top_k, vocab)[:, None]
        ordered = ordered.masked_fill(rank >= keep_k, float("-inf"))
        probs = ordered.softmax(-1)
        drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None], default: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [B, vocab]: rows with a generator draw their own noise (a seeded
    request), the others share one draw from `default`."""
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[-1], device=probs.device).exponential_(generator=default)
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(-1)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, generators: Sequence[torch.Generator | None],
                default: torch.Generator) -> torch.Tensor:
    """Token ids [B] drawn from rows [B, vocab] (fp32), each tempered (temperature > 0) and filtered."""
    probs = filter_logits(logits / temperature[:, None], top_k, top_p, min_p).softmax(-1)
    return draw(probs, generators, default)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
