"""The batched sampler against hand-computed filtered distributions, and its two paths (top
candidates vs the whole row sorted) against each other."""

from __future__ import annotations

import pytest
import torch

from lmfleet.model import sampling
from lmfleet.model.sampling import sample_rows, seeded_generator

PROBS = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05], dtype=torch.float64)


def _filtered(top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """The distribution the settings define, computed by hand from PROBS (sorted descending)."""
    keep = torch.ones(len(PROBS), dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    p = torch.where(keep, PROBS, 0.0)
    p = p / p.sum()
    # top-p keeps the smallest prefix whose mass reaches top_p
    before = p.cumsum(0) - p
    p = torch.where(before < top_p, p, 0.0) if top_p < 1 else p
    p = torch.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("top_k,top_p,min_p", [(0, 1.0, 0.0), (3, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.5),
                                               (4, 0.8, 0.0), (5, 0.9, 0.3)])
def test_empirical_distribution_matches_the_filtered_one(top_k, top_p, min_p):
    rows = 40_000
    logits = PROBS.log().float()[[3, 0, 5, 1, 4, 2]]  # not in descending order
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    batch = logits.expand(rows, -1).contiguous()
    full = lambda v, dtype: torch.full((rows,), v, dtype=dtype)  # noqa: E731
    tokens = sample_rows(batch, full(1.0, torch.float32), full(top_k, torch.long), full(top_p, torch.float32),
                         full(min_p, torch.float32), [None] * rows, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=6).double() / rows
    expected = _filtered(top_k, top_p, min_p)[order]
    assert (counts - expected).abs().max() < 0.015, (counts, expected)
    assert bool((counts[expected == 0] == 0).all())  # an excluded token is never drawn


def test_candidate_path_draws_the_same_tokens_as_the_full_sort(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    vocab, rows = 5000, 64
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(1, 8, rows)[:, None]  # flat to peaked
    args = (torch.full((rows,), 0.8), torch.tensor([0, 50] * (rows // 2)), torch.full((rows,), 0.95),
            torch.full((rows,), 0.01))

    def draw():
        return sample_rows(logits, *args, [None] * rows, torch.Generator().manual_seed(7))

    with_candidates = draw()
    monkeypatch.setattr(sampling, "CANDIDATES", vocab)  # every row takes the sorted whole-row path
    assert torch.equal(with_candidates, draw())


def test_a_seeded_row_does_not_depend_on_its_batch():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 300, generator=gen)
    ones = torch.ones(8)

    def draw(rows, seeded_at):
        gens = [seeded_generator(11, torch.device("cpu")) if i == seeded_at else None for i in range(len(rows))]
        return sample_rows(logits[rows], ones[: len(rows)], torch.zeros(len(rows), dtype=torch.long),
                           torch.full((len(rows),), 0.9), torch.zeros(len(rows)), gens,
                           torch.Generator().manual_seed(len(rows)))

    alone = draw([5], 0)[0]
    assert draw([0, 1, 5, 7], 2)[2] == alone
    assert draw(list(range(8)), 5)[5] == alone


def test_logit_bias_adds_each_rows_own_bias_step_after_step() -> None:
    """Rows with and without a bias in one batch, two steps (the second from the tensors kept on
    the sequence): each row's logits move by exactly its own bias, computed by hand."""
    from lmfleet.engine.params import SamplingParams
    from lmfleet.engine.sampler import apply_logit_bias
    from lmfleet.engine.sequence import Sequence

    biases = [{3: 5.0, 0: -2.5}, {}, {7: 100.0}]
    seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(logit_bias=b)) for i, b in enumerate(biases)]
    for step in range(2):
        logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        expected = logits.clone()
        for row, bias in enumerate(biases):
            for token, value in bias.items():
                expected[row, token] += value
        assert torch.equal(apply_logit_bias(logits, seqs), expected)
