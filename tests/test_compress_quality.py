"""Compression on a briefly trained model: int4 (round to nearest, GPTQ, AWQ), pruning
(magnitude, Wanda, 2:4) and distillation, each judged by perplexity on held-out text against
the model it came from or a control run; and the one-line refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmfleet.data.corpus import prepare_corpus, stdlib_root
from lmfleet.model import load_model, load_tokenizer, save_model

from .helpers import assert_one_line_error, run_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUDENT = """
[model]
flavor = "debug"
num_hidden_layers = 2
hidden_size = 64
intermediate_size = 192
num_attention_heads = 2
num_key_value_heads = 1

[data]
seq_len = 64

[batch]
micro_batch = 16

[schedule]
warmup_steps = 10

[train]
steps = 120

[eval]
every = 0
tokens = 20000

[checkpoint]
every = 0
"""


def ok(result) -> None:
    assert result.returncode == 0, result.stderr + result.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compress-quality")


@pytest.fixture(scope="module")
def corpus(root) -> Path:
    out = root / "corpus"
    prepare_corpus([str(stdlib_root() / "json"), str(stdlib_root() / "email")], out, vocab_size=512,
                   val_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def trained(root, corpus) -> Path:
    """The debug model trained for 500 steps (the teacher, and what is compressed)."""
    ok(run_cli("train", str(CONFIGS / "debug.toml"), "--data", str(corpus), "--out", str(root / "run"),
               "--steps", "500", "--set", "batch.micro_batch=16", "--set", "eval.every=0",
               "--set", "checkpoint.every=0"))
    return root / "run" / "final"


@pytest.fixture(scope="module")
def with_outliers(root, trained) -> Path:
    """The trained model with activation outliers, as large trained models have them: 4 channels of
    each block's RMSNorm weights scaled up 30x and the columns of the linears that read them scaled
    down 30x. The function is the same (the float logits agree); rounding to 4 bits is not."""
    model = load_model(trained)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.layers:
            for norm, readers in ((block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj,
                                                            block.self_attn.v_proj]),
                                  (block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj])):
                channels = torch.randperm(norm.weight.numel(), generator=generator)[:4]
                norm.weight[channels] *= 30
                for linear in readers:
                    linear.weight[:, channels] /= 30
    path = root / "outliers"
    save_model(model, path, tokenizer=load_tokenizer(trained))
    ids = torch.randint(0, 512, (2, 32), generator=generator)
    with torch.no_grad():
        a, b = load_model(trained)(ids), load_model(path)(ids)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    return path


def perplexity(model_dir: Path, corpus: Path) -> float:
    result = run_cli("eval", str(model_dir), "--data", str(corpus), "--max-tokens", "30000", "--no-speed", "--json")
    ok(result)
    return json.loads(result.stdout)["perplexity"]


def test_int4_stores_groups_an_independent_quantization_gives_and_runs_in_the_engine(root, trained) -> None:
    from lmfleet.engine import LLMEngine, SamplingParams
    from lmfleet.engine.linear import Int4WeightLinear

    out = root / "int4-g32"
    ok(run_cli("quantize", str(trained), "--out", str(out), "--method", "int4", "--group-size", "32"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["format"], config["bits"], config["group_size"]) == ("lmfleet-int4/1", 4, 32)
    stored, original = load_file(str(out / "model.safetensors")), load_file(str(trained / "model.safetensors"))
    name = "model.layers.2.mlp.down_proj"
    w = original[f"{name}.weight"].double().reshape(128, -1, 32)  # [out, groups, 32]
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 15)
    packed = stored[f"{name}.qweight"]
    assert packed.dtype == torch.uint8 and packed.shape == (128, 384 // 2)
    unpacked = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(128, 384)
    assert torch.equal(unpacked.double(), q.reshape(128, 384))
    assert torch.equal(stored[f"{name}.zeros"].double(), zero)
    assert torch.allclose(stored[f"{name}.scales"].double(), scale, rtol=1e-6)
    assert json.loads(run_cli("info", str(out), "--json").stdout)["quantization"] == \
        "lmfleet-int4/1: 28 linear layers, 4-bit weights"
    # The engine's kernel (aten int4, bf16 activations) against the reference dequantize-then-matmul.
    engine = LLMEngine(out, kv_cache_memory=4 * 2**20)
    fused = engine.runner.model.layers[0].mlp.gate_up_proj
    assert isinstance(fused, Int4WeightLinear)
    reference = load_model(out)
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = torch.cat([reference.layers[0].mlp.gate_proj(x), reference.layers[0].mlp.up_proj(x)], dim=-1)
        assert ((fused(x) - expected).norm() / expected.norm()).item() < 1e-2
    text = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert len(text.token_ids) == 8


def test_gptq_and_awq_beat_plain_int4_on_held_out_text(root, corpus, with_outliers) -> None:
    """Same model, same group size, same data: perplexity of GPTQ and of AWQ below round-to-nearest."""
    ppl = {"fp32": perplexity(with_outliers, corpus)}
    for calibration in ("none", "gptq", "awq"):
        out = root / f"int4-{calibration}"
        ok(run_cli("quantize", str(with_outliers), "--out", str(out), "--method", "int4", "--group-size", "64",
                   "--calibrate", calibration, "--data", str(corpus), "--samples", "32", "--seq-len", "128"))
        assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"] == calibration
        ppl[calibration] = perplexity(out, corpus)
    assert ppl["fp32"] < ppl["gptq"] < ppl["none"], ppl
    assert ppl["fp32"] < ppl["awq"] < ppl["none"], ppl


def test_pruning_reaches_the_exact_sparsity_and_wanda_loses_less_than_magnitude(root, corpus, trained) -> None:
    ppl = {"dense": perplexity(trained, corpus)}
    for method, extra in (("magnitude", ()), ("wanda", ("--data", str(corpus), "--samples", "32")),
                          ("2:4", ("--pattern", "2:4"))):
        out = root / f"pruned-{method.replace(':', '-')}"
        args = ("--method", "magnitude", *extra) if method == "2:4" else ("--method", method, "--sparsity", "0.5", *extra)
        ok(run_cli("prune", str(trained), "--out", str(out), *args))
        pruned, dense = load_model(out), load_model(trained)
        for (name, p), q in zip(pruned.layers.named_parameters(), dense.layers.parameters()):
            if "proj" not in name:
                assert torch.equal(p, q)  # norms untouched
                continue
            zero = p == 0
            assert int(zero.sum()) == p.numel() // 2, name  # exactly half of every layer
            assert torch.equal(p[~zero], q[~zero])  # what is kept is unchanged
            if method == "wanda":
                assert (zero.sum(dim=1) == p.shape[1] // 2).all()  # half of every output row
            if method == "2:4":
                assert (zero.reshape(p.shape[0], -1, 4).sum(dim=-1) == 2).all()  # 2 of every 4
            if method == "magnitude":  # the smallest |w| went
                assert p.abs()[~zero].min() >= q.abs()[zero].max()
        config = json.loads((out / "config.json").read_text())["pruning_config"]
        assert config["achieved"] == 0.5
        ppl[method] = perplexity(out, corpus)
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"], ppl


def test_a_distilled_student_beats_the_same_student_from_scratch(root, corpus, trained, with_outliers) -> None:
    """Same student, same steps, same tokens: the one trained on the teacher's distributions too
    reaches a lower validation loss."""
    config = root / "student.toml"
    config.write_text(STUDENT)
    ok(run_cli("train", str(config), "--data", str(corpus), "--out", str(root / "scratch")))
    ok(run_cli("distill", str(trained), str(config), "--data", str(corpus), "--out", str(root / "distilled")))
    scratch, distilled = perplexity(root / "scratch" / "final", corpus), perplexity(root / "distilled" / "final", corpus)
    assert distilled < scratch, (distilled, scratch)
    meta = json.loads(next((root / "distilled" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["teacher"]["path"] == str(trained) and meta["distill"] == {"temperature": 1.0, "alpha": 0.5}
    records = [json.loads(line) for line in (root / "distilled" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 120
    for r in steps:  # the logged loss is the mix of its logged parts (T = 1, alpha = 0.5)
        assert r["distill_kl"] > 0 and abs(r["loss"] - (0.5 * r["distill_kl"] + 0.5 * r["distill_ce"])) < 1e-5
    # Resuming needs the same teacher and loss, and a distillation run stays one.
    resume = ("--data", str(corpus), "--out", str(root / "distilled"), "--resume", "--steps", "130")
    assert_one_line_error(run_cli("distill", str(trained), str(config), *resume, "--temperature", "2"),
                          "it was distilled with {'temperature': 1.0, 'alpha': 0.5}")
    assert_one_line_error(run_cli("distill", str(with_outliers), str(config), *resume), "is another model")
    assert_one_line_error(run_cli("train", str(config), *resume), "and this run has no teacher")


def test_bad_compression_input_is_one_line_and_leaves_no_output(root, corpus, trained, tmp_path) -> None:
    out = tmp_path / "out"
    cases = [
        (("quantize", str(trained), "--out", str(out), "--method", "int4", "--group-size", "256"),
         "--group-size 256 does not divide the input size 128 of layers.0.self_attn.q_proj"),
        (("quantize", str(trained), "--out", str(out), "--method", "int4", "--group-size", "48"),
         "--group-size 48 is not one of [32, 64, 128, 256]"),
        (("quantize", str(trained), "--out", str(out), "--method", "int4", "--calibrate", "gptq"),
         "needs calibration data"),
        (("quantize", str(trained), "--out", str(out), "--method", "int8", "--calibrate", "awq"),
         "applies to --method int4"),
        (("quantize", str(trained), "--out", str(out), "--method", "int4", "--calibrate", "gptq", "--data",
          str(corpus), "--samples", "100000"), "the calibration set is too small"),
        (("prune", str(trained), "--out", str(out), "--sparsity", "1.0"), "--sparsity 1.0 must be in [0, 1)"),
        (("prune", str(trained), "--out", str(out), "--sparsity", "-0.1"), "must be in [0, 1)"),
        (("prune", str(trained), "--out", str(out), "--pattern", "4:2"), "is not N:M"),
        (("prune", str(trained), "--out", str(out), "--pattern", "2:4", "--sparsity", "0.3"), "contradicts"),
        (("prune", str(trained), "--out", str(out), "--method", "wanda", "--sparsity", "0.5"), "needs calibration"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli(*args), needle)
        assert not out.exists(), args
    quantized = root / "int4-g32"
    if not quantized.exists():
        ok(run_cli("quantize", str(trained), "--out", str(quantized), "--method", "int4", "--group-size", "32"))
    assert_one_line_error(run_cli("quantize", str(quantized), "--out", str(out), "--method", "int4"), "already quantized")
    assert_one_line_error(run_cli("prune", str(quantized), "--out", str(out), "--sparsity", "0.5"), "is quantized")
    # A student whose vocabulary is not the teacher's.
    config = tmp_path / "student.toml"
    config.write_text(STUDENT.replace('flavor = "debug"', 'flavor = "debug"\nvocab_size = 600'))
    assert_one_line_error(run_cli("distill", str(trained), str(config), "--data", str(corpus), "--out", str(out)),
                          "the student's vocabulary (600 tokens) differs from the teacher's (512")
    assert not out.exists()
    assert_one_line_error(run_cli("distill", str(trained), str(config), "--data", str(corpus), "--out", str(out),
                                  "--temperature", "0"), "distill.temperature=0.0 must be > 0")
    config.write_text(STUDENT)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((trained / "config.json").read_text())
    assert_one_line_error(run_cli("distill", str(weightless), str(config), "--data", str(corpus), "--out", str(out)),
                          "model.safetensors")
    assert_one_line_error(run_cli("distill", str(trained), str(config), "--data", str(corpus), "--out", str(out),
                                  "--set", "model.max_position_embeddings=1024", "--set", "data.seq_len=600"),
                          "data.seq_len=600 exceeds the teacher's max_position_embeddings=512")
    assert not out.exists()
