"""GGUF export read back with the gguf package's reader; the offline benchmark CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmfleet.model import ModelConfig, build_model, load_tokenizer, save_model
from lmfleet.model.gguf_export import unpermute_for_rope

from .helpers import run_cli

gguf = pytest.importorskip("gguf")  # a dev dependency: installed by `make install`


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "model"
    config = ModelConfig.from_flavor("debug", vocab_size=tokenizer.vocab_size, tie_word_embeddings=False)
    save_model(build_model(config, seed=2), path, tokenizer=tokenizer)
    return path


@pytest.mark.parametrize("out_type,tolerance", [("F32", 0.0), ("F16", 1e-3), ("Q8_0", 2e-3)])
def test_gguf_tensors_and_metadata_round_trip(model_dir, tmp_path, out_type, tolerance) -> None:
    from gguf.quants import dequantize

    out = tmp_path / f"m.{out_type}.gguf"
    result = run_cli("export", "gguf", str(model_dir), str(out), "--type", out_type)
    assert result.returncode == 0, result.stderr
    reader = gguf.GGUFReader(str(out))
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    from lmfleet.model import load_model

    model = load_model(model_dir)
    config = model.config
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == config.num_hidden_layers
    assert field("llama.attention.head_count_kv") == config.num_key_value_heads
    assert field("tokenizer.ggml.model") == "gpt2"
    tok = load_tokenizer(model_dir)
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[tok.eos_id] == tok.eos_token and field("tokenizer.ggml.eos_token_id") == tok.eos_id
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 1 + 9 * config.num_hidden_layers  # embd, norm, output + 9 per block

    def read(name: str) -> torch.Tensor:
        t = tensors[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    q = unpermute_for_rope(read("blk.1.attn_q.weight"), config.num_attention_heads)
    k = unpermute_for_rope(read("blk.1.attn_k.weight"), config.num_key_value_heads)
    layer = model.layers[1]
    for got, want in [(q, layer.self_attn.q_proj.weight), (k, layer.self_attn.k_proj.weight),
                      (read("blk.1.ffn_down.weight"), layer.mlp.down_proj.weight),
                      (read("token_embd.weight"), model.embed_tokens.weight),
                      (read("output.weight"), model.lm_head.weight)]:
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= tolerance


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
