"""Next-token sampling over a batch of logit rows, on the logits' device, each row with its own
settings: temperature, top-k, top-p, min-p, and its own generator when seeded.

A draw is inverse-CDF sampling with one uniform number per row, so a seeded row's token depends
only on its own logits and its generator, never on the batch. Rows with top-k or top-p are drawn
among their most likely tokens in descending order: the top `CANDIDATES` (one `topk`) when their
top-k or nucleus lies inside them, else the whole row sorted — the same tokens either way. The
engine's sampler (`lmfleet.engine.sampler`) and `lmfleet.model.generate` both draw through
`sample_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing logits by it would overflow)
CANDIDATES = 1024  # tokens a filtered row is drawn among when its top-k / nucleus fits in them


def uniforms(generators: Sequence[torch.Generator | None], default: torch.Generator,
             device: torch.device) -> torch.Tensor:
    """One U[0, 1) number per row: a seeded row's from its own generator, the others' from `default`."""
    out = torch.rand(len(generators), generator=default, device=device)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.rand(1, generator=g, device=device)[0]
    return out


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over unnormalised probabilities [B, n]: the first index whose cumulative mass
    exceeds u * total (never an index of probability zero) -> [B]."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    index = torch.searchsorted(cdf, (u * total)[:, None], right=True).clamp_(max=probs.shape[-1] - 1)[:, 0]
    # A row with no finite positive mass (its logits were not finite) takes its most probable entry.
    bad = ~(total > 0) | ~total.isfinite()
    if bool(bad.any()):
        index[bad] = probs[bad].nan_to_num(nan=-1.0).argmax(-1)
    return index


def _filtered_in_order(values: torch.Tensor, log_z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       min_p: torch.Tensor) -> torch.Tensor:
    """Probabilities of a row's most likely tokens `values` [B, n] (logits, descending; `log_z` the
    row's log-partition) after top-k, top-p and min-p, unnormalised (zero where excluded)."""
    rank = torch.arange(values.shape[-1], device=values.device)
    limited = top_k > 0
    values = values.masked_fill(limited[:, None] & (rank >= top_k[:, None]), float("-inf"))
    # After top-k the distribution is renormalised over the k kept tokens.
    norm = torch.where(limited[:, None], values.logsumexp(-1, keepdim=True), log_z)
    probs = (values - norm).exp()
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]
    drop[:, 0] = False  # the most likely token is always kept, however small top_p
    probs = probs.masked_fill(drop, 0.0)
    return probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                min_p: torch.Tensor, generators: Sequence[torch.Generator | None],
                default: torch.Generator) -> torch.Tensor:
    """Token ids [B] drawn from rows [B, vocab] (fp32), each tempered (temperature > 0) and filtered
    (top-k 0, top-p 1, min-p 0: off)."""
    vocab = logits.shape[-1]
    logits = logits / temperature[:, None]
    u = uniforms(generators, default, logits.device)
    top_k = torch.where(top_k >= vocab, 0, top_k)
    tokens = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    plain = (top_k == 0) & (top_p >= 1)
    if bool(plain.any()):
        probs = logits[plain].softmax(-1)
        probs = probs.masked_fill(probs < min_p[plain][:, None] * probs.amax(-1, keepdim=True), 0.0)
        tokens[plain] = _draw(probs, u[plain])
    rest = ~plain
    if bool(rest.any()):
        rows, k, p, m = logits[rest], top_k[rest], top_p[rest], min_p[rest]
        log_z = rows.logsumexp(-1, keepdim=True)
        width = min(vocab, max(CANDIDATES, int(k.max())))
        # A nucleus can fit in `width` tokens only if width x the largest probability reaches p.
        fits = (k > 0) | (width * (rows.amax(-1) - log_z[:, 0]).exp() >= p) | (width == vocab)
        if bool(fits.any()):
            values, order = rows.topk(width)
            # A nucleus reaching p inside the candidates (with a margin for rounding) lies in them.
            mass = (values - log_z).exp().sum(-1)
            fits &= (k > 0) | (mass >= p + 1e-5) | (width == vocab)
        drawn = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if bool(fits.any()):
            probs = _filtered_in_order(values[fits], log_z[fits], k[fits], p[fits], m[fits])
            drawn[fits] = order[fits].gather(-1, _draw(probs, u[rest][fits])[:, None])[:, 0]
        if not bool(fits.all()):
            wide = ~fits
            values, order = rows[wide].sort(-1, descending=True)
            probs = _filtered_in_order(values, log_z[wide], k[wide], p[wide], m[wide])
            drawn[wide] = order.gather(-1, _draw(probs, u[rest][wide])[:, None])[:, 0]
        tokens[rest] = drawn
    return tokens


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
