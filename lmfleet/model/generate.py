"""Simple single-sequence generation with a contiguous KV cache, for smoke use and tests.

The serving engine (paged cache, continuous batching) lives in `lmfleet.engine`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmfleet.errors import ConfigError
from lmfleet.model.config import ModelConfig
from lmfleet.model.sampling import GREEDY_BELOW, sample_rows, seeded_generator
from lmfleet.model.transformer import Transformer, attention_mask


class DenseKVCache:
    """Keys and values of one batch of sequences, preallocated to `max_len` positions."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.window = config.sliding_window
        self.start = 0  # position of the first token of the current forward

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s, t = self.start, q.shape[-2]
        self.k[layer_idx, :, :, s:s + t] = k
        self.v[layer_idx, :, :, s:s + t] = v
        keys, values = self.k[layer_idx, :, :, :s + t], self.v[layer_idx, :, :, :s + t]
        if t == 1 and (self.window is None or s < self.window):
            return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
        q_pos = torch.arange(s, s + t, device=q.device)
        mask = attention_mask(q_pos, torch.arange(s + t, device=q.device), self.window)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> int:
    """Greedy when temperature is 0 (below GREEDY_BELOW), else a draw from the tempered, top-k/top-p filtered softmax,
    through the same sampler as the engine (a seeded draw gives the engine's token for equal logits)."""
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    device = logits.device
    generator = generator or torch.Generator(device=device).manual_seed(torch.seed() % 2**63)
    token = sample_rows(logits.float()[None], torch.tensor([float(temperature)], device=device),
                        torch.tensor([top_k or 0], device=device), torch.tensor([1.0 if top_p is None else top_p],
                                                                                 device=device),
                        torch.zeros(1, device=device), [generator], generator)
    return int(token[0])


@torch.inference_mode()
def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_ids: Sequence[int] = (),
             seed: int | None = None) -> Iterator[int]:
    """Yield generated token ids one at a time (stop ids are yielded, then generation ends)."""
    config = model.config
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0")
    total = len(prompt_ids) + max_new_tokens
    if total > config.max_position_embeddings:
        raise ConfigError(f"max_new_tokens={max_new_tokens} exceeds the model's context of "
                          f"{config.max_position_embeddings} minus {len(prompt_ids)} prompt tokens")
    bad = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
    if bad:
        raise ConfigError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})")
    device = model.embed_tokens.weight.device
    cache = DenseKVCache(config, 1, total, device, model.embed_tokens.weight.dtype)
    generator = seeded_generator(seed, device) if seed is not None else None
    tokens = torch.tensor([list(prompt_ids)], device=device)
    pos = 0
    stop = set(stop_ids)
    for _ in range(max_new_tokens):
        cache.start = pos
        logits = model(tokens, positions=torch.arange(pos, pos + tokens.shape[1], device=device), cache=cache)
        pos += tokens.shape[1]
        next_id = sample_next(logits[0, -1], temperature, top_k, top_p, generator)
        yield next_id
        if next_id in stop:
            return
        tokens = torch.tensor([[next_id]], device=device)
