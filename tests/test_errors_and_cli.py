"""Bad input gets a one-line error naming the problem; the CLI works end to end."""

from __future__ import annotations

import json

import pytest

from lmfleet.errors import CheckpointError, ConfigError
from lmfleet.model import ModelConfig, build_model, load_model, save_model

from .helpers import assert_one_line_error, run_cli


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "model"
    config = ModelConfig.from_flavor("debug", vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    save_model(build_model(config, seed=0), path, tokenizer=tokenizer)
    return path


@pytest.mark.parametrize("fields,needle", [
    (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads=3 does not divide hidden_size=100"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads=3 must divide"),
    (dict(vocab_size=0), "vocab_size=0 must be a positive integer"),
    (dict(model_type="gpt2"), "model_type='gpt2' is not supported"),
    (dict(model_type="qwen2"), "bias on q/k/v only"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "must be positive numbers"),
    (dict(max_position_embeddings=2**31), "at most 16,777,216"),
    (dict(num_hidden_layers=10**6), "num_hidden_layers=1000000 must be a positive integer .at most 1,024."),
    (dict(head_dim=2**20), "head_dim=1048576 must be a positive even integer up to 4096"),
])
def test_config_validation(fields, needle) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        ModelConfig.from_flavor("debug", **fields)


def test_missing_and_malformed_model_dirs(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        load_model(tmp_path)


def test_corrupt_and_mismatched_weights(model_dir) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    weights = model_dir / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_model(model_dir)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(model_dir)
    weights.write_bytes(good)
    (model_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 5}))
    with pytest.raises(CheckpointError, match="missing tensors"):
        load_model(model_dir)
    (model_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(model_dir)
    weights.unlink()
    (model_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_model(model_dir)


def test_a_bad_device_is_a_one_line_error(model_dir) -> None:
    import torch

    from lmfleet.model.checkpoint import resolve_device

    for bad in ("foo", "meta", "cuda:x"):
        with pytest.raises(ConfigError, match="--device"):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda")
    assert_one_line_error(run_cli("eval", str(model_dir), "--data", str(model_dir), "--device", "foo"), "--device 'foo'")


def test_a_shard_index_cannot_point_outside_its_directory(model_dir, tmp_path) -> None:
    """A crafted model.safetensors.index.json naming a file elsewhere on the host is refused, even
    when that file exists and holds the right tensors."""
    from safetensors.torch import load_file

    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes((model_dir / "model.safetensors").read_bytes())
    names = load_file(str(elsewhere)).keys()
    (model_dir / "model.safetensors").unlink()
    for target in (f"../{elsewhere.name}", str(elsewhere)):
        index = {"metadata": {}, "weight_map": {name: target for name in names}}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="outside its directory"):
            load_model(model_dir)


@pytest.mark.integration
def test_cli_errors_are_one_line(tmp_path, model_dir) -> None:
    assert_one_line_error(run_cli("info", str(tmp_path / "absent")), "does not exist")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{")
    assert_one_line_error(run_cli("generate", str(tmp_path / "bad"), "hi"), "config.json is not valid JSON")
    (model_dir / "model.safetensors").write_bytes(b"garbage" * 10)
    assert_one_line_error(run_cli("generate", str(model_dir), "hi"), "not a readable safetensors file")
    assert_one_line_error(run_cli("init", str(tmp_path / "m"), "--tokenizer", str(model_dir), "--flavor", "debug",
                                   "--set", "hidden_size=100", "--set", "num_attention_heads=3"),
                           "num_attention_heads=3 does not divide hidden_size=100")
    assert_one_line_error(run_cli("init", str(tmp_path / "m"), "--tokenizer", str(model_dir), "--flavor", "huge"),
                           "unknown model flavor 'huge'")


@pytest.mark.integration
def test_cli_init_info_generate(tmp_path, text_dir) -> None:
    corpus, model = tmp_path / "corpus", tmp_path / "model"
    assert run_cli("data", "prepare", "--source", str(text_dir), "--out", str(corpus),
                   "--vocab-size", "400").returncode == 0
    result = run_cli("init", str(model), "--tokenizer", str(corpus), "--flavor", "debug")
    assert result.returncode == 0, result.stderr
    details = json.loads(run_cli("info", str(model), "--json").stdout)
    assert details["parameters"] == sum(p.numel() for p in load_model(model).parameters())
    assert details["architecture"] == "LlamaForCausalLM" and details["dtype"] == "F32"
    assert details["config"]["vocab_size"] == 400
    a = run_cli("generate", str(model), "def add", "--max-tokens", "12", "--temperature", "0.9", "--seed", "3")
    b = run_cli("generate", str(model), "def add", "--max-tokens", "12", "--temperature", "0.9", "--seed", "3")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("def add") and len(a.stdout) > len("def add\n")
    chat = run_cli("generate", str(model), "hello", "--chat", "--max-tokens", "5")
    assert chat.returncode == 0, chat.stderr
    assert "Usage" in run_cli("generate", "--help").stdout


def test_error_text_is_printed_verbatim(tmp_path) -> None:
    """Square brackets in an error (an extra's name, a path) are text, not console markup."""
    target = tmp_path / "corpus[grpc]"
    target.write_text("a file")
    result = run_cli("data", "prepare", "--source", "stdlib", "--out", str(target))
    assert_one_line_error(result, f"--out {target} is a file")
