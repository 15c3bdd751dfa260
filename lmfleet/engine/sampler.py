"""Next-token selection for a batch of sequences, each with its own SamplingParams, on the device.

Order: logit_bias and penalties on the raw logits, then temperature, top-k, top-p, min-p, and a draw
(`lmfleet.model.sampling`). Every step is one set of batched tensor operations over the rows that
need it; the host receives only the chosen token ids (and the logprobs asked for). A seeded request
draws from its own generator, so its tokens do not depend on what else is in the batch. Logprobs
are of the model's raw distribution.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch

from lmfleet.engine.sequence import Sequence
from lmfleet.model.sampling import sample_rows, seeded_generator


@dataclass
class SampleResult:
    token_id: int
    logprob: dict[str, Any] | None  # {"token_id", "logprob", "top": [(id, logprob), ...]}


def _occurrences(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Counts [len(token_lists), vocab] of each token id in each list."""
    lengths = torch.tensor([len(t) for t in token_lists])
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths).to(device)
    cols = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    counts = torch.zeros(len(token_lists), vocab, device=device)
    return counts.index_put_((rows, cols), torch.ones(len(cols), device=device), accumulate=True)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's logit_bias added to its logits (in place on `logits` [B, vocab])."""
    rows, cols, values = [], [], []
    for i, s in enumerate(seqs):
        if not s.params.logit_bias:
            continue
        cached = s.bias_tensors
        if cached is None or cached[1].device != logits.device or cached[1].dtype != logits.dtype:
            bias = s.params.logit_bias
            cached = s.bias_tensors = (torch.tensor(list(bias), device=logits.device),
                                       torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device))
        rows.append(torch.full_like(cached[0], i))
        cols.append(cached[0])
        values.append(cached[1])
    if rows:
        logits.index_put_((torch.cat(rows), torch.cat(cols)), torch.cat(values), accumulate=True)
    return logits


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens, presence and frequency penalties over
    output tokens, for the rows that ask for them (in place on `logits` [B, vocab])."""
    vocab, device = logits.shape[-1], logits.device
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        seen = _occurrences([seqs[i].token_ids for i in rep], vocab, device) > 0
        penalty = torch.tensor([seqs[i].params.repetition_penalty for i in rep], device=device)[:, None]
        rows = logits[rep]
        logits[rep] = torch.where(seen, torch.where(rows > 0, rows / penalty, rows * penalty), rows)
    pf = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    if pf:
        counts = _occurrences([seqs[i].output_token_ids for i in pf], vocab, device)
        presence = torch.tensor([seqs[i].params.presence_penalty for i in pf], device=device)[:, None]
        frequency = torch.tensor([seqs[i].params.frequency_penalty for i in pf], device=device)[:, None]
        logits[pf] -= presence * (counts > 0) + frequency * counts
    return logits


class Sampler:
    def __init__(self, seed: int = 0):
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}  # for unseeded requests, per device

    def _generator(self, seq: Sequence, device: torch.device) -> torch.Generator | None:
        if seq.seed is None:
            return None
        if seq.generator is None or seq.generator.device != device:
            seq.generator = seeded_generator(seq.seed, device)
        return seq.generator

    @staticmethod
    def _plain_greedy(seq: Sequence) -> bool:
        p = seq.params
        return (p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not p.presence_penalty
                and not p.frequency_penalty and not p.logit_bias)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampleResult]:
        """One token per row of `logits` [len(seqs), vocab] (fp32, on the model's device)."""
        if all(self._plain_greedy(seq) for seq in seqs):  # the common serving case: one argmax
            return [SampleResult(int(t), None) for t in logits.argmax(-1).tolist()]
        device = logits.device
        params = [seq.params for seq in seqs]
        with_logprobs = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw = logits[with_logprobs].log_softmax(-1) if with_logprobs else None
        logits = apply_penalties(apply_logit_bias(logits.clone(), seqs), seqs)
        tokens = logits.argmax(-1)
        drawn = [i for i, p in enumerate(params) if not p.greedy]
        if drawn:
            def column(name: str, dtype: torch.dtype) -> torch.Tensor:
                return torch.tensor([getattr(params[i], name) for i in drawn], dtype=dtype, device=device)

            if device not in self.generators:
                self.generators[device] = seeded_generator(self.seed, device)
            tokens[drawn] = sample_rows(logits[drawn], column("temperature", torch.float32),
                                        column("top_k", torch.long), column("top_p", torch.float32),
                                        column("min_p", torch.float32),
                                        [self._generator(seqs[i], device) for i in drawn], self.generators[device])
        token_ids = tokens.tolist()
        results = [SampleResult(t, None) for t in token_ids]
        if raw is not None:
            chosen = raw.gather(-1, tokens[with_logprobs][:, None])[:, 0].tolist()
            k = max(params[i].logprobs for i in with_logprobs)
            top = raw.topk(min(k, raw.shape[-1])) if k else None
            top_ids, top_values = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
            for row, i in enumerate(with_logprobs):
                want = params[i].logprobs
                results[i].logprob = {"token_id": token_ids[i], "logprob": chosen[row],
                                      "top": list(zip(top_ids[row][:want], top_values[row][:want])) if want else []}
        return results
