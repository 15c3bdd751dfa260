"""The KV-cache sampler against Hugging Face generate and against a cache-free recomputation."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmfleet.errors import ConfigError
from lmfleet.model import ModelConfig, build_model, generate, load_model, save_model


def _greedy_without_cache(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("model_type,window", [("llama", None), ("mistral", 6)])
def test_greedy_matches_hf_generate(model_type, window, tmp_path) -> None:
    config = ModelConfig.from_flavor("debug", model_type=model_type, sliding_window=window,
                                     tie_word_embeddings=model_type == "llama")
    model = build_model(config, seed=7)
    save_model(model, tmp_path)
    prompt = [5, 17, 300, 2, 9, 44, 12, 1000, 3]
    ours = list(generate(model, prompt, max_new_tokens=20))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
    assert ours == _greedy_without_cache(load_model(tmp_path), prompt, 20)


def test_seeded_sampling_is_reproducible_and_stops() -> None:
    model = build_model(ModelConfig.from_flavor("debug"), seed=1)
    a = list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=11))
    b = list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=11))
    assert a == b and len(a) == 30
    stopped = list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.9, seed=11,
                            stop_ids=[a[4]]))
    assert stopped == a[:a.index(a[4]) + 1]


def test_generate_rejects_bad_requests() -> None:
    model = build_model(ModelConfig.from_flavor("debug"), seed=1)
    with pytest.raises(ConfigError, match="exceeds the model's context of 512 minus 3 prompt tokens"):
        list(generate(model, [1, 2, 3], max_new_tokens=600))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        list(generate(model, [1, 5000], max_new_tokens=1))
    with pytest.raises(ConfigError, match="empty"):
        list(generate(model, [], max_new_tokens=1))
