"""Next-token selection for a batch of sequences, each with its own SamplingParams.

Order: penalties on the raw logits, then temperature, top-k, top-p, min-p, and a draw. A seeded
request draws from its own generator (an exponential race: argmax p / E with E ~ Exp(1)), so its
tokens do not depend on what else is in the batch. Logprobs are of the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lmfleet.engine.sequence import Sequence
from lmfleet.model.generate import filter_logits


@dataclass
class SampleResult:
    token_id: int
    logprob: dict[str, Any] | None  # {"token_id", "logprob", "top": [(id, logprob), ...]}


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        out = seq.output_token_ids
        if out:
            ids, counts = torch.tensor(out, dtype=torch.long).unique(return_counts=True)
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts.to(logits.dtype)
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def _draw(self, probs: torch.Tensor, generator: torch.Generator | None) -> int:
        noise = torch.empty_like(probs).exponential_(generator=generator or self.generator)
        return int((probs / noise).argmax())

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        p = seq.params
        return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        plain = [self._plain_greedy(seq) for seq in seqs]
        if all(plain):  # the common serving case: one argmax on the device, one small copy back
            return [SampleResult(int(t), None) for t in logits.argmax(-1).tolist()]
        logits = logits.float().cpu()
        results = []
        for row, seq in zip(logits, seqs):
            p = seq.params
            logprob = None
            if p.logprobs is not None:
                raw = row.log_softmax(-1)
            row = apply_penalties(row.clone(), seq)
            if p.greedy:
                token = int(row.argmax())
            else:
                probs = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p).softmax(-1)
                token = self._draw(probs, seq.generator)
            if p.logprobs is not None:
                top = torch.topk(raw, p.logprobs) if p.logprobs else None
                logprob = {"token_id": token, "logprob": float(raw[token]),
                           "top": list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []}
            results.append(SampleResult(token, logprob))
        return results
