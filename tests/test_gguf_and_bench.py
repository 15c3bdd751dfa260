"""GGUF export read back with the gguf package's reader; the offline benchmark CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmfleet.errors import ConfigError
from lmfleet.model import ModelConfig, build_model, load_model, load_tokenizer, save_model
from lmfleet.model.gguf_export import export_gguf, unpermute_for_rope

from .helpers import run_cli

gguf = pytest.importorskip("gguf")  # a dev dependency: installed by `make install`

# Round-off relative to a tensor's largest |value|: F16 keeps 11 significant bits; Q8_0 rounds to
# 1/254 of its block's largest value, plus the rounding of that scale to F16; Q4_0 (16 steps of
# max/8 from -8 to 7) to up to a whole step at the end opposite the largest value.
TOLERANCES = [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 1 / 127), ("Q4_0", 1.01 / 8)]

# Hugging Face module names (without `model.`) -> llama.cpp's, as its converter maps them.
LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                   "post_attention_layernorm": "ffn_norm"}


def _save(path, tokenizer, seed: int, **overrides):
    config = ModelConfig.from_flavor("debug", vocab_size=tokenizer.vocab_size, **overrides)
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random values everywhere (biases and norms too), so a swapped tensor shows
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    save_model(model, path, tokenizer=tokenizer)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return _save(tmp_path_factory.mktemp("gguf") / "model", tokenizer, seed=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def bias_model_dir(tmp_path_factory, tokenizer):
    """Qwen2-style q/k/v biases and a tied head: biases are permuted like their rows, no output.weight."""
    return _save(tmp_path_factory.mktemp("gguf") / "bias", tokenizer, seed=5, model_type="qwen2",
                 qkv_bias=True, tie_word_embeddings=True)


def _reader(path):
    reader = gguf.GGUFReader(str(path))
    return reader, (lambda name: reader.fields[name].contents())


def _read(t) -> torch.Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))


def _expected_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor llama.cpp should find, by its llama.cpp name, in Hugging Face row order."""
    config = model.config
    out = {"token_embd.weight": model.embed_tokens.weight, "output_norm.weight": model.norm.weight}
    if not config.tie_word_embeddings:
        out["output.weight"] = model.lm_head.weight
    for name, tensor in model.state_dict().items():
        if name.startswith("layers."):  # layers.{i}.{module}.{weight|bias}
            parts = name.split(".")
            out[f"blk.{parts[1]}.{LLAMA_CPP_NAMES['.'.join(parts[2:-1])]}.{parts[-1]}"] = tensor
    return out


def _assert_every_tensor_round_trips(reader, model, out_type: str, tolerance: float) -> None:
    """Names, shapes, storage types and values of every tensor; `tolerance` is relative to max |w|."""
    config = model.config
    tensors = {t.name: t for t in reader.tensors}
    expected = _expected_tensors(model)
    assert set(tensors) - {"rope_freqs.weight"} == set(expected)
    per_layer = {name.split(".", 2)[2] for name in expected if name.startswith("blk.0.")}
    assert per_layer >= {f"{n}.weight" for n in LLAMA_CPP_NAMES.values()}
    matrix_type = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
                   "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0}[out_type]
    for name, want in expected.items():
        t = tensors[name]
        # GGUF lists dimensions fastest-first: [in, out] for a [out, in] torch weight.
        assert tuple(int(d) for d in reversed(t.shape)) == tuple(want.shape), name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else matrix_type), name
        got = _read(t).reshape(want.shape)
        if ".attn_q." in name:
            got = unpermute_for_rope(got, config.num_attention_heads)
        elif ".attn_k." in name:
            got = unpermute_for_rope(got, config.num_key_value_heads)
        assert (got - want.float()).abs().max().item() <= tolerance * want.abs().max().item(), name


@pytest.mark.parametrize("out_type,tolerance", TOLERANCES)
def test_gguf_tensors_and_metadata_round_trip(model_dir, tmp_path, out_type, tolerance) -> None:
    out = tmp_path / f"m.{out_type}.gguf"
    result = run_cli("export", "gguf", str(model_dir), str(out), "--type", out_type)
    assert result.returncode == 0, result.stderr
    reader, field = _reader(out)
    model = load_model(model_dir)
    config = model.config
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config.num_hidden_layers
    assert field("llama.attention.head_count_kv") == config.num_key_value_heads
    assert field("tokenizer.ggml.model") == "gpt2"
    tok = load_tokenizer(model_dir)
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[tok.eos_id] == tok.eos_token and field("tokenizer.ggml.eos_token_id") == tok.eos_id
    assert "llama.rope.scaling.type" not in reader.fields
    assert len(reader.tensors) == 2 + 1 + 9 * config.num_hidden_layers  # embd, norm, output + 9 per block
    _assert_every_tensor_round_trips(reader, model, out_type, tolerance)


def test_an_interrupted_export_leaves_no_file_and_keeps_the_old_one(model_dir, tmp_path, monkeypatch) -> None:
    """Cut short while writing tensors (Ctrl-C, a full disk), the export leaves neither a truncated
    .gguf nor its temporary file, and a previous file of that name is untouched."""
    import gguf

    out = tmp_path / "m.gguf"
    export_gguf(model_dir, out, "F16")
    before = out.read_bytes()

    def cut_short(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model_dir, out, "Q8_0")
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model_dir, tmp_path / "new.gguf", "Q8_0")
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_quantized_directory_exports_its_rounded_weights(model_dir, tmp_path) -> None:
    """An int4 directory exports the weights its integers stand for (dequantized), exactly in F32."""
    from lmfleet.compress.quantize import dequantize_model

    quantized = tmp_path / "int4"
    result = run_cli("quantize", str(model_dir), "--out", str(quantized), "--method", "int4", "--group-size", "32")
    assert result.returncode == 0, result.stderr
    reader, _ = _reader(export_gguf(quantized, tmp_path / "q.gguf", "F32"))
    rounded = dequantize_model(load_model(quantized))
    assert not torch.equal(rounded.layers[0].mlp.up_proj.weight, load_model(model_dir).layers[0].mlp.up_proj.weight)
    _assert_every_tensor_round_trips(reader, rounded, "F32", 0.0)


@pytest.mark.parametrize("out_type,tolerance", [TOLERANCES[0], TOLERANCES[2]])
def test_gguf_every_tensor_with_biases_and_tied_head(bias_model_dir, tmp_path, out_type, tolerance) -> None:
    out = export_gguf(bias_model_dir, tmp_path / "b.gguf", out_type)
    reader, _ = _reader(out)
    model = load_model(bias_model_dir)
    assert len(reader.tensors) == 2 + 12 * model.config.num_hidden_layers  # + q/k/v biases, no output
    _assert_every_tensor_round_trips(reader, model, out_type, tolerance)


# ---- RoPE scaling -------------------------------------------------------------------------------

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 16.0,
          "original_max_position_embeddings": 256}


def _hf_rope_divisors(model_dir) -> torch.Tensor:
    """transformers' own llama3 init against its unscaled frequencies: the divisor per frequency."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = transformers.AutoConfig.from_pretrained(model_dir)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    base, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    return base / scaled


def test_gguf_llama3_rope_writes_rope_freqs(tmp_path, tokenizer) -> None:
    model_dir = _save(tmp_path / "llama3", tokenizer, seed=6, rope_scaling=dict(LLAMA3))
    out = export_gguf(model_dir, tmp_path / "l3.gguf", "Q8_0")
    reader, field = _reader(out)
    tensors = {t.name: t for t in reader.tensors}
    freqs = tensors["rope_freqs.weight"]
    want = _hf_rope_divisors(model_dir)
    config = load_model(model_dir).config
    assert freqs.tensor_type == gguf.GGMLQuantizationType.F32
    assert tuple(int(d) for d in freqs.shape) == (config.head_dim // 2,)
    assert want.min() == 1.0 and want.max() == LLAMA3["factor"] and ((want > 1) & (want < 8)).sum() >= 2
    torch.testing.assert_close(_read(freqs), want.float(), rtol=1e-6, atol=0)
    # llama.cpp takes the factors from the tensor: a scaling type on top would apply it twice.
    assert "llama.rope.scaling.type" not in reader.fields and "llama.rope.scaling.factor" not in reader.fields
    assert field("llama.rope.freq_base") == pytest.approx(config.rope_theta)


def test_gguf_linear_rope_writes_type_and_factor(tmp_path, tokenizer) -> None:
    model_dir = _save(tmp_path / "linear", tokenizer, seed=7, rope_scaling={"rope_type": "linear", "factor": 4.0})
    reader, field = _reader(export_gguf(model_dir, tmp_path / "lin.gguf", "F16"))
    assert field("llama.rope.scaling.type") == "linear"
    assert field("llama.rope.scaling.factor") == pytest.approx(4.0)
    assert "rope_freqs.weight" not in {t.name for t in reader.tensors}


def test_gguf_refuses_a_rope_type_it_cannot_write(tmp_path, tokenizer, monkeypatch) -> None:
    # A rope type the model code accepts (here: made to) but GGUF export does not know.
    import lmfleet.model.config as config_module

    monkeypatch.setattr(config_module, "ROPE_TYPES", (*config_module.ROPE_TYPES, "yarn"))
    model_dir = _save(tmp_path / "yarn", tokenizer, seed=8, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    out = tmp_path / "yarn.gguf"
    with pytest.raises(ConfigError, match=r"rope_type 'yarn'.*(default|linear|llama3)"):
        export_gguf(model_dir, out, "F32")
    assert not out.exists()


def test_gguf_refuses_sliding_window(tmp_path, tokenizer) -> None:
    model_dir = _save(tmp_path / "mistral", tokenizer, seed=9, model_type="mistral", sliding_window=8)
    with pytest.raises(ConfigError, match="sliding_window=8"):
        export_gguf(model_dir, tmp_path / "sw.gguf", "F32")


def test_bench_offline_cli(model_dir) -> None:
    result = run_cli("bench", "offline", str(model_dir), "--num-prompts", "6", "--input-len-range", "8:20",
                     "--output-len-range", "4:8", "--prefix-len", "32", "--max-num-batched-tokens", "64", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_prompts"] == 6 and 6 * 4 <= report["output_tokens"] <= 6 * 8
    assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0
    # All six share a 32-token (two-block) prefix; those admitted in later steps reuse it.
    assert report["prefix_cache_hit_rate"] > 0
    bad = run_cli("bench", "offline", str(model_dir), "--input-len-range", "9:3")
    assert bad.returncode == 1 and "--input-len-range='9:3' needs 1 <= A <= B" in bad.stderr
