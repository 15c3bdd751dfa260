"""One request's state: its tokens, how many of them the KV cache holds, its blocks, its sampling."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lmfleet.engine.params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at its first admission
    num_hashed_blocks: int = 0  # leading blocks of `block_table` already hashed for the prefix cache
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    generator: torch.Generator | None = None  # a seeded request's own, on the logits' device (the sampler's)
    first_token_time: float | None = None
    finished_time: float | None = None
    scheduled_time: float | None = None
    num_preemptions: int = 0
    # Text bookkeeping (the engine detokenizes): text emitted so far, and held back for stop strings.
    text: str = ""
    pending_text: str = ""
    index: int = 0  # which of the n choices of its request
    sent_text: int = 0  # characters of `text` already reported in an output's delta
    sent_tokens: int = 0  # output tokens already reported
    # Choice 0 of the same request (for choices 1..n-1): they wait for its prompt to be in the
    # prefix cache and then share those blocks.
    leader: Sequence | None = field(default=None, repr=False, compare=False)
    # params.logit_bias as (token ids, biases) tensors on the logits' device, built at first use
    # (the sampler adds them every step: a 1,024-entry bias is not rebuilt from Python each time).
    bias_tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def seed(self) -> int | None:
        """Choice i of a seeded request draws with seed + i."""
        return None if self.params.seed is None else self.params.seed + self.index

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks(self, block_size: int, tokens: int | None = None) -> int:
        return -(-(self.num_tokens if tokens is None else tokens) // block_size)

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]
