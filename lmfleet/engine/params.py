"""SamplingParams: what a request asks of the sampler; validates every field's type and range."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lmfleet.errors import ConfigError
from lmfleet.model.sampling import GREEDY_BELOW

# Bounds on what one request may ask for: each is a size a client controls.
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_SEED = 2**63  # exclusive: torch generators take seeds in [0, 2^64), and JSON clients 63-bit ints
MAX_PRIORITY = 2**31
MAX_TOP_K = 2**31  # exclusive; a top-k at or above the vocabulary means off
MIN_REPETITION_PENALTY = 0.01
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_LOGIT_BIAS = 100.0  # the OpenAI API's range: [-100, 100]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _own_list(value: object) -> object:
    """A list of its own (a caller's list may change later); None: empty; other types are left for
    check() to name."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else value


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the top k
    priority: int = 0  # lower runs first when the engine schedules by priority
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = _own_list(self.stop), _own_list(self.stop_token_ids)
        if self.logit_bias is None:
            self.logit_bias = {}
        elif isinstance(self.logit_bias, dict):
            self.logit_bias = dict(self.logit_bias)
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the first field out of range (the engine checks again on
        admission: a field set after construction cannot slip through)."""
        for message in self._problems():
            raise ConfigError(message)

    def _problems(self):
        """Each failed check's message, in field order (the first one is raised)."""
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            yield f"max_tokens={self.max_tokens!r} must be an integer >= 1"
        if not (_is_real(self.temperature) and self.temperature >= 0):
            yield f"temperature={self.temperature!r} must be a finite number >= 0"
        if not (_is_int(self.top_k) and 0 <= self.top_k < MAX_TOP_K):
            yield f"top_k={self.top_k!r} must be an integer in [0, 2^31) (0: off)"
        if not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            yield f"top_p={self.top_p!r} must be in (0, 1]"
        if not (_is_real(self.min_p) and 0 <= self.min_p <= 1):
            yield f"min_p={self.min_p!r} must be in [0, 1]"
        if not (_is_real(self.repetition_penalty) and MIN_REPETITION_PENALTY <= self.repetition_penalty <= 10):
            yield f"repetition_penalty={self.repetition_penalty!r} must be in [{MIN_REPETITION_PENALTY}, 10]"
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -2 <= value <= 2):
                yield f"{name}={value!r} must be in [-2, 2]"
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < MAX_SEED):
            yield f"seed={self.seed!r} must be an integer in [0, 2^63)"
        if not (_is_int(self.n) and 1 <= self.n <= MAX_N):
            yield f"n={self.n!r} must be an integer in [1, {MAX_N}]"
        if self.seed is not None and _is_int(self.n) and self.seed + self.n > MAX_SEED:
            yield f"seed={self.seed} + n={self.n} must stay below 2^63 (choice i draws with seed + i)"
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            yield f"logprobs={self.logprobs!r} must be an integer in [0, {MAX_LOGPROBS}]"
        if not isinstance(self.stop, list) or not isinstance(self.stop_token_ids, list):
            yield "stop and stop_token_ids must be lists"
            return
        if len(self.stop) > MAX_STOP_STRINGS:
            yield f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed"
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop):
            yield f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_CHARS} characters"
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            yield f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed"
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            yield "stop_token_ids must be integers >= 0"
        if not (_is_int(self.priority) and -MAX_PRIORITY <= self.priority < MAX_PRIORITY):
            yield f"priority={self.priority!r} must be an integer in [-2^31, 2^31)"
        if not isinstance(self.logit_bias, dict):
            yield "logit_bias must be a mapping of token id to bias"
        elif len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            yield f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed"
        elif not all(_is_int(t) and t >= 0 and _is_real(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                     for t, b in self.logit_bias.items()):
            yield "logit_bias maps token ids >= 0 to biases in [-100, 100]"
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                yield f"{name}={getattr(self, name)!r} must be true or false"

    @property
    def greedy(self) -> bool:
        """Temperature 0, or so close to it that sampling would divide by (almost) zero."""
        return self.temperature < GREEDY_BELOW
