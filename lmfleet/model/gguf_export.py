"""Export a model directory to GGUF (llama.cpp, ollama) with the `gguf` package: F32, F16, Q8_0 or Q4_0.

The tensors and metadata follow llama.cpp's own converter for the `llama` architecture: q/k
projection rows are permuted from Hugging Face's half-split RoPE layout to llama.cpp's interleaved
one, and the byte-level BPE tokenizer is written as a `gpt2` vocabulary with its merges.
RoPE scaling is written as llama.cpp reads it (linear: two keys; llama3: a `rope_freqs` tensor);
anything the file cannot say is refused with a ConfigError, never exported as a different model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.model.checkpoint import load_model
from lmfleet.model.config import ModelConfig
from lmfleet.model.tokenizer import load_tokenizer
from lmfleet.model.transformer import rope_inv_freq

OUT_TYPES = ("F32", "F16", "Q8_0", "Q4_0")
ROPE_TYPES = ("default", "linear", "llama3")  # the RoPE variants a `llama` GGUF can carry


def permute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_for_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    return (weight.reshape(n_heads, weight.shape[0] // n_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def check_exportable(config: ModelConfig) -> None:
    """Refuse what the `llama` GGUF metadata cannot express, rather than drop it silently."""
    if config.sliding_window is not None:
        raise ConfigError(f"GGUF export of sliding-window attention (sliding_window={config.sliding_window}) "
                          "is not supported yet")
    if config.rope_type not in ROPE_TYPES:
        raise ConfigError(f"GGUF export does not support rope_type {config.rope_type!r}; "
                          f"it writes {list(ROPE_TYPES)} RoPE scaling")


def rope_freq_factors(config: ModelConfig) -> torch.Tensor:
    """llama3 scaling as llama.cpp's `rope_freqs` tensor: per frequency, what the base one is divided by."""
    return rope_inv_freq(config.replace(rope_scaling=None)) / rope_inv_freq(config)


def gguf_tensors(model: torch.nn.Module, config: ModelConfig) -> dict[str, torch.Tensor]:
    """llama.cpp tensor names -> tensors (fp32, CPU)."""
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["embed_tokens.weight"], "output_norm.weight": state["norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    if config.rope_type == "llama3":
        out["rope_freqs.weight"] = rope_freq_factors(config)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(config.num_hidden_layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                key = f"layers.{i}.{ours}.{kind}"
                if key not in state:
                    continue
                tensor = state[key]
                if ours == "self_attn.q_proj":
                    tensor = permute_for_rope(tensor, config.num_attention_heads)
                elif ours == "self_attn.k_proj":
                    tensor = permute_for_rope(tensor, config.num_key_value_heads)
                out[f"blk.{i}.{theirs}.{kind}"] = tensor
    return out


def export_gguf(model_dir: str | Path, out_path: str | Path, out_type: str = "F16") -> Path:
    try:
        import gguf
    except ImportError:
        raise LmfleetError("GGUF export needs the `gguf` package: pip install 'lmfleet[gguf]'") from None
    if out_type not in OUT_TYPES:
        raise ConfigError(f"--type {out_type!r} is not supported; use one of {list(OUT_TYPES)}")
    model = load_model(model_dir, dtype=torch.float32)
    from lmfleet.compress.quantize import dequantize_model

    dequantize_model(model)  # a quantized directory exports its rounded weights
    config = model.config
    check_exportable(config)
    tok = load_tokenizer(model_dir)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():
        raise ConfigError(f"{out_path}: the directory {out_path.parent} does not exist")
    if out_path.is_dir():
        raise ConfigError(f"{out_path} is a directory; give the .gguf file to write")
    # Written next to its place and renamed once complete: an interrupted export leaves no half file.
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        _write_gguf(gguf, tmp, model, config, tok, out_type, Path(model_dir).name)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _write_gguf(gguf, path: Path, model, config: ModelConfig, tok, out_type: str, name: str) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    if config.rope_type == "linear":  # llama3 needs no key: its factors travel as rope_freqs.weight
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[out_type]
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tok, config, gguf)
    for name, tensor in gguf_tensors(model, config).items():
        data = tensor.numpy()
        if data.ndim == 1 or out_type == "F32":  # norms and biases stay fp32, as llama.cpp's converter does
            writer.add_tensor(name, data.astype(np.float32))
        elif out_type == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        else:  # Q8_0 / Q4_0: llama.cpp's blocks of 32 along each row
            quant = getattr(gguf.GGMLQuantizationType, out_type)
            if data.shape[-1] % 32:
                raise ConfigError(f"--type {out_type}: tensor {name} has rows of {data.shape[-1]}, not a multiple "
                                  "of llama.cpp's block of 32")
            writer.add_tensor(name, gguf.quants.quantize(data, quant), raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_tokenizer(writer, tok, config: ModelConfig, gguf) -> None:
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise ConfigError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    tokens = [""] * config.vocab_size
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for piece, idx in vocab.items():
        if idx < config.vocab_size:
            tokens[idx], types[idx] = piece, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < config.vocab_size:
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    for i, piece in enumerate(tokens):
        if not piece:
            tokens[i] = f"[PAD{i}]"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tok.bos_id), (writer.add_eos_token_id, tok.eos_id),
                          (writer.add_pad_token_id, tok.pad_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(tok.bos_id is not None and tok.encode("x")[:1] == [tok.bos_id])
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
