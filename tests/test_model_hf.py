"""lmfleet's Transformer against Hugging Face transformers on the same random weights."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lmfleet.model import ModelConfig, build_model, load_model, save_model
from lmfleet.model.checkpoint import from_hf_name, to_hf_name

SHAPE = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)

HF_CASES = {
    "llama-gqa-untied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha-tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama-bias": (transformers.LlamaConfig, dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama3-rope": (transformers.LlamaConfig, dict(
        num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "qwen2-tied": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2-untied": (transformers.Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=False,
                                                    rope_theta=1e6)),
    "mistral-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=7)),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (biases and norms too), so every parameter matters to the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if "norm" in name else noise)


def _hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    config_cls, extra = HF_CASES[case]
    config = config_cls(**SHAPE, **extra)
    config._attn_implementation = "eager"  # the plainest reference
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomize(model, seed)
    return model.eval()


def _inputs(batch: int = 2, seq: int = 23) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_to_lmfleet_logits(case: str, tmp_path) -> None:
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    x = _inputs()
    with torch.no_grad():
        expected = hf(x).logits
        got = ours(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-tied", "mistral-window", "llama3-rope"])
def test_lmfleet_to_hf_logits(case: str, tmp_path) -> None:
    hf_config = HF_CASES[case][0](**SHAPE, **HF_CASES[case][1])
    # Build the lmfleet config from the HF one's dict, then a model from lmfleet's own init.
    from lmfleet.model.config import config_from_hf

    config = config_from_hf(hf_config.to_dict())
    ours = build_model(config, seed=3)
    _randomize(ours, seed=4)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    x = _inputs()
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def _file_tensor_names(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("case", ["qwen2-untied", "llama-mha-tied", "llama-bias", "mistral-window"])
def test_round_trip_both_ways_is_bit_exact(case: str, tmp_path) -> None:
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    reference = hf.state_dict()
    # The documented mapping: lmfleet's names are Hugging Face's without the `model.` prefix.
    assert {to_hf_name(name) for name in ours.state_dict()} == set(reference)
    assert {from_hf_name(name) for name in reference} == set(ours.state_dict())
    save_model(ours, tmp_path / "ours")
    assert _file_tensor_names(tmp_path / "ours") == _file_tensor_names(tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval().state_dict()
    assert set(back) == set(reference)
    for name, tensor in reference.items():
        assert back[name].shape == tensor.shape and torch.equal(back[name], tensor), name


def test_sharded_checkpoint_round_trips(tmp_path) -> None:
    config = ModelConfig.from_flavor("debug", tie_word_embeddings=False)
    ours = build_model(config, seed=0)
    save_model(ours, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists()
    x = _inputs(1, 16) % config.vocab_size
    with torch.no_grad():
        reference = ours(x)
        assert torch.equal(load_model(tmp_path)(x), reference)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert (hf(x).logits - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_half_precision(dtype, tmp_path) -> None:
    hf = _hf_model("llama-gqa-untied")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=dtype)
    assert {p.dtype for p in ours.parameters()} == {dtype}
    x = _inputs()
    with torch.no_grad():
        reference = hf(x).logits
        got = ours(x).float()
    # Half precision: close to the fp32 reference, same top token nearly everywhere.
    assert (got - reference).abs().max().item() < 0.1
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_per_sequence_positions_match_plain_forward() -> None:
    model = build_model(ModelConfig.from_flavor("debug"), seed=0)
    x = _inputs(2, 12) % model.config.vocab_size
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x, positions=positions), atol=1e-6)


def test_param_count_matches_config() -> None:
    for flavor in ("debug", "tiny"):
        config = ModelConfig.from_flavor(flavor)
        model = build_model(config)
        assert sum(p.numel() for p in model.parameters()) == config.num_params()
    config = ModelConfig(**SHAPE, num_key_value_heads=2, qkv_bias=True, model_type="qwen2")
    assert sum(p.numel() for p in build_model(config).parameters()) == config.num_params()
