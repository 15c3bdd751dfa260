"""Weight-only int8 quantization against the floating-point model it came from: the stored
integers against an independent recomputation, logits against fp32, the engine's kernel against
the reference layer, and the quantized directory served through `lmfleet serve`."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file

from lmfleet.compress.quantize import QuantizedLinear, quantize_int8
from lmfleet.model import load_model

from .helpers import assert_one_line_error, chat_model_dir, run_cli, serve_process


@pytest.fixture(scope="module")
def dirs(tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compress")
    fp32 = chat_model_dir(root, tokenizer, 256, 41)
    result = run_cli("quantize", str(fp32), "--out", str(root / "int8"), "--method", "int8")
    assert result.returncode == 0, result.stderr
    return fp32, root / "int8"


def test_int8_rows_round_to_their_own_scale() -> None:
    """Per output channel: scale = max|w| / 127, every element within half a step of its value."""
    w = torch.randn(48, 64, dtype=torch.float64) * torch.logspace(-3, 1, 48, dtype=torch.float64)[:, None]
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert torch.allclose(scales.double(), w.abs().amax(dim=1) / 127, rtol=1e-6)
    assert (q.abs().amax(dim=1) == 127).all()  # each row's largest weight uses the full range
    error = (q.double() * scales.double()[:, None] - w).abs()
    assert (error <= scales.double()[:, None] / 2 * (1 + 1e-5)).all()


def test_the_quantized_directory_holds_what_an_independent_quantization_gives(dirs) -> None:
    fp32_dir, int8_dir = dirs
    config = json.loads((int8_dir / "config.json").read_text())["quantization_config"]
    assert config["format"] == "lmfleet-int8/1" and config["bits"] == 8 and len(config["modules"]) == 4 * 7
    stored = load_file(str(int8_dir / "model.safetensors"))
    original = load_file(str(fp32_dir / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert f"{name}.weight" not in stored and stored[f"{name}.qweight"].dtype == torch.int8
    w = original[f"{name}.weight"].float()
    scale = w.abs().amax(dim=1) / 127
    assert torch.equal(stored[f"{name}.qweight"], torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
    assert torch.allclose(stored[f"{name}.scales"], scale)
    assert torch.equal(stored["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    on_disk = sum(f.stat().st_size for f in int8_dir.glob("*.safetensors"))
    assert on_disk < 0.8 * sum(f.stat().st_size for f in fp32_dir.glob("*.safetensors"))
    info = run_cli("info", str(int8_dir), "--json")
    assert json.loads(info.stdout)["quantization"].startswith("lmfleet-int8/1: 28 linear layers")


def test_int8_logits_stay_close_to_fp32(dirs) -> None:
    fp32_dir, int8_dir = dirs
    fp32, int8 = load_model(fp32_dir), load_model(int8_dir)
    assert isinstance(int8.layers[0].self_attn.q_proj, QuantizedLinear)
    ids = torch.randint(0, 400, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp32(ids), int8(ids)
    relative = ((a - b).norm() / a.norm()).item()
    assert relative < 0.02, relative


def test_the_engines_int8_kernel_matches_the_reference_layer() -> None:
    """Int8WeightLinear (aten's int8 kernel, bf16 activations) against QuantizedLinear's
    dequantize-then-matmul in fp32: equal up to bf16 rounding of the activations."""
    from lmfleet.engine.linear import Int8WeightLinear, int8_kernel_available

    assert int8_kernel_available()
    linear = torch.nn.Linear(256, 96, bias=True)
    layer = QuantizedLinear.from_linear(linear)
    x = torch.randn(5, 7, 256)
    with torch.no_grad():
        reference, kernel = layer(x), Int8WeightLinear(layer)(x)
    assert kernel.shape == reference.shape and kernel.dtype == torch.float32
    assert ((kernel - reference).norm() / reference.norm()).item() < 1e-2


def test_the_engine_and_the_server_run_the_quantized_directory(dirs) -> None:
    """The engine fuses q|k|v and gate|up of the quantized layers and runs them through the int8
    kernel; `lmfleet serve` answers the openai client with the engine's own greedy text."""
    from lmfleet.engine import LLMEngine, SamplingParams
    from lmfleet.engine.linear import Int8WeightLinear

    _, int8_dir = dirs
    engine = LLMEngine(int8_dir, kv_cache_memory=4 * 2**20)
    assert isinstance(engine.runner.model.layers[0].self_attn.qkv_proj, Int8WeightLinear)
    reference = engine.generate(["The quick brown"], SamplingParams(max_tokens=12, temperature=0))[0]
    proc, url = serve_process(int8_dir, "--kv-cache-memory", "4MiB", "--served-model-name", "q8",
                              "--log-level", "warning")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=60)
        answer = client.completions.create(model="q8", prompt="The quick brown", max_tokens=12, temperature=0)
        assert answer.choices[0].text == reference.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_quantization_input_is_one_line_and_writes_nothing(dirs, tmp_path) -> None:
    fp32_dir, int8_dir = dirs
    assert_one_line_error(run_cli("quantize", str(int8_dir), "--out", str(tmp_path / "again")), "already quantized")
    assert not (tmp_path / "again").exists()
    assert_one_line_error(run_cli("quantize", str(fp32_dir), "--out", str(int8_dir)), "already exists")
    assert_one_line_error(run_cli("quantize", str(fp32_dir), "--out", str(tmp_path / "x"), "--method", "int3"),
                          "'int3' is not one of ['int8', 'int4']")
    assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in int8_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["quantization_config"]["modules"].append("layers.9.mlp.up_proj")
    (broken / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("generate", str(broken), "hi", "--max-tokens", "2"),
                          "names 'layers.9.mlp.up_proj', which the model does not have")


def test_the_head_quantized_too_unties_it_and_the_engine_runs_it(dirs, tmp_path) -> None:
    """--include-head on a model whose head is tied to the embedding: the head is stored as int8,
    the embedding stays fp32 for the lookup, config.json says untied; close to fp32 still."""
    from lmfleet.engine import LLMEngine, SamplingParams
    from lmfleet.engine.linear import Int8WeightLinear

    fp32_dir, _ = dirs
    assert json.loads((fp32_dir / "config.json").read_text())["tie_word_embeddings"] is True
    out = tmp_path / "int8-head"
    result = run_cli("quantize", str(fp32_dir), "--out", str(out), "--include-head")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" in config["quantization_config"]["modules"]
    stored, original = load_file(str(out / "model.safetensors")), load_file(str(fp32_dir / "model.safetensors"))
    assert stored["lm_head.qweight"].dtype == torch.int8
    assert torch.equal(stored["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = load_model(fp32_dir)(ids), load_model(out)(ids)
    assert ((a - b).norm() / a.norm()).item() < 0.03
    engine = LLMEngine(out, kv_cache_memory=4 * 2**20)
    assert isinstance(engine.runner.model.lm_head, Int8WeightLinear)
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].token_ids) == 8


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_hostile_quantized_directory_is_refused_in_one_line(dirs, tmp_path) -> None:
    """Wrong tensor dtypes, out-of-range zero points, non-finite scales, a fused group quantized
    only in part, a fractional group size: one line naming the problem, never a traceback."""
    from safetensors.torch import save_file

    fp32_dir, int8_dir = dirs
    int4_dir = tmp_path / "int4"
    assert run_cli("quantize", str(fp32_dir), "--out", str(int4_dir), "--method", "int4", "--group-size", "32").returncode == 0

    def tampered(source: Path, name: str, edit_tensors=None, edit_config=None) -> Path:
        path = _copy(source, tmp_path / name)
        if edit_tensors is not None:
            tensors = load_file(str(path / "model.safetensors"))
            edit_tensors(tensors)
            save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        if edit_config is not None:
            config = json.loads((path / "config.json").read_text())
            edit_config(config["quantization_config"])
            (path / "config.json").write_text(json.dumps(config))
        return path

    key = "model.layers.0.mlp.down_proj"
    cases = [
        (tampered(int4_dir, "float-qweight", lambda t: t.update({f"{key}.qweight": t[f"{key}.qweight"].float()})),
         f"tensor {key}.qweight is float32, config.json implies torch.uint8"),
        (tampered(int8_dir, "uint8-qweight", lambda t: t.update({f"{key}.qweight": t[f"{key}.qweight"].view(torch.uint8)})),
         f"tensor {key}.qweight is uint8, config.json implies torch.int8"),
        (tampered(int4_dir, "big-zeros", lambda t: t[f"{key}.zeros"].fill_(200)), "zeros holds values above 15"),
        (tampered(int8_dir, "nan-scales", lambda t: t[f"{key}.scales"].fill_(float("nan"))), "not finite"),
        (tampered(int4_dir, "partial", edit_config=lambda c: c["modules"].remove("layers.1.self_attn.k_proj")),
         "quantizes only some of layers.1.{q_proj, k_proj, v_proj}"),
        (tampered(int4_dir, "float-group", edit_config=lambda c: c.update(group_size=32.0)), "group_size 32.0"),
    ]
    for path, needle in cases:
        assert_one_line_error(run_cli("generate", str(path), "hi", "--max-tokens", "2"), needle)


def test_a_bf16_model_stays_bf16_when_pruned_or_quantized(dirs, tmp_path) -> None:
    """Compression computes in fp32 but writes the weights back in the source's dtype."""
    from lmfleet.model import load_tokenizer, save_model

    fp32_dir, _ = dirs
    source = tmp_path / "bf16"
    save_model(load_model(fp32_dir).to(torch.bfloat16), source, tokenizer=load_tokenizer(fp32_dir))
    for command, extra in (("prune", ("--sparsity", "0.5")), ("quantize", ("--method", "int4", "--group-size", "32"))):
        out = tmp_path / command
        result = run_cli(command, str(source), "--out", str(out), *extra)
        assert result.returncode == 0, result.stderr
        stored = load_file(str(out / "model.safetensors"))
        assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
        assert stored["model.norm.weight"].dtype == torch.bfloat16
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
        if command == "prune":
            w = stored["model.layers.0.mlp.up_proj.weight"]
            assert w.dtype == torch.bfloat16 and int((w == 0).sum()) == w.numel() // 2
        else:
            assert stored["model.layers.0.mlp.up_proj.scales"].dtype == torch.float32
