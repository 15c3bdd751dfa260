"""Model directories in Hugging Face layout: config.json, model.safetensors (or shards + index),
tokenizer files, generation_config.json. Reading never unpickles; tensors come from mmap'd
safetensors files one at a time."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lmfleet.errors import CheckpointError, ConfigError, LmfleetError
from lmfleet.model.config import ModelConfig, config_from_hf, config_to_hf
from lmfleet.model.tokenizer import Tokenizer
from lmfleet.model.transformer import Transformer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, config_dtype: str | None = None) -> torch.dtype:
    """fp32/bf16/fp16 (or their long names, or a torch.dtype); "auto" takes the checkpoint's own."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return DTYPES.get(config_dtype or "float32", torch.float32)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; use fp32, bf16, fp16 or auto")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r}: give cpu, cuda, cuda:N or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device (use cpu or auto)")
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: lmfleet runs on cpu or cuda")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- names ---------------------------------------------------------------------------------------

def to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> str:
    return name.removeprefix("model.")


# ---- reading -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def _model_dir(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (expected a model directory with config.json)")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json: not a model directory")
    return directory


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a model directory (config.json, plus eos ids from generation_config.json)."""
    directory = _model_dir(path)
    raw = _read_json(directory / "config.json")
    try:
        config = config_from_hf(raw)
    except TypeError as exc:
        raise CheckpointError(f"{directory / 'config.json'} has a field of the wrong type: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from None
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        gen = _read_json(gen_path)
        if gen.get("eos_token_id") is not None:
            config.eos_token_id = gen["eos_token_id"]
    return config


def _weight_files(directory: Path) -> list[Path]:
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map")
        names = sorted({str(f) for f in weight_map.values()})
        outside = [f for f in names if f != Path(f).name or f in ("", ".", "..")]
        if outside:
            raise CheckpointError(f"{index} lists weight files outside its directory: {outside[:3]} (shards are "
                                  "plain file names next to the index)")
        files = [directory / f for f in names]
    elif (directory / SAFETENSORS).is_file():
        files = [directory / SAFETENSORS]
    else:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise CheckpointError(f"{directory} holds only pickle weights (*.bin/*.pt); lmfleet reads safetensors "
                                  "only — convert them with transformers' save_pretrained(safe_serialization=True)")
        raise CheckpointError(f"{directory} has no {SAFETENSORS} or {SAFETENSORS_INDEX}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{directory} lacks weight shards listed in its index: {missing}")
    return files


def load_state_dict(path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a model directory under lmfleet names, read from mmap'd safetensors."""
    directory = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state[from_hf_name(key)] = tensor
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    return state


def load_model(path: str | os.PathLike, dtype: str | torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu") -> Transformer:
    """Load a Hugging Face-layout model directory as an lmfleet Transformer in eval mode."""
    directory = _model_dir(path)
    config = read_config(directory)
    raw = _read_json(directory / "config.json")
    torch_dtype = parse_dtype(dtype, raw.get("dtype") or raw.get("torch_dtype"))
    with torch.device("meta"):
        model = Transformer(config)
    if raw.get("quantization_config") is not None:
        from lmfleet.compress.quantize import prepare_quantized

        try:
            prepare_quantized(model, raw["quantization_config"], str(directory / "config.json"))
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
    state = load_state_dict(directory, torch_dtype, device)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = {k: v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{directory} does not match its config.json: missing tensors "
                              f"{[to_hf_name(k) for k in missing][:5]}, unexpected {[to_hf_name(k) for k in unexpected][:5]}")
    for key, tensor in state.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(f"{directory}: tensor {to_hf_name(key)} has shape {tuple(tensor.shape)}, "
                                  f"config.json implies {tuple(want.shape)}")
        if tensor.is_floating_point() != want.is_floating_point() or \
                (not want.is_floating_point() and tensor.dtype != want.dtype):
            raise CheckpointError(f"{directory}: tensor {to_hf_name(key)} is {str(tensor.dtype).removeprefix('torch.')}, "
                                  f"config.json implies {'a float' if want.is_floating_point() else want.dtype}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if raw.get("quantization_config") is not None:
        from lmfleet.compress.quantize import check_quantized_values

        try:
            check_quantized_values(model, str(directory))
        except ConfigError as exc:
            raise CheckpointError(str(exc)) from None
    return model.eval()


# ---- writing -------------------------------------------------------------------------------------

def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def save_model(model: Transformer, path: str | os.PathLike, tokenizer: Tokenizer | None = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict[str, Any] | None = None) -> Path:
    """Write `model` (and its tokenizer) as a Hugging Face-layout directory, atomically."""
    directory = Path(path)
    config = model.config
    state = {to_hf_name(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    dtype = next(iter(state.values())).dtype
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model directory is an ordinary one
    try:
        shards = _shards(state, max_shard_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SAFETENSORS), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=metadata)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = config_to_hf(config, dtype_name(dtype))
        if tokenizer is not None:
            for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                               ("pad_token_id", tokenizer.pad_id)):
                if hf_config.get(key) is None:
                    hf_config[key] = value
        hf_config.update(extra_config or {})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if hf_config.get(k) is not None}
        if tokenizer is not None and tokenizer.chat_template and len(tokenizer.stop_ids) > 1:
            generation["eos_token_id"] = tokenizer.stop_ids  # chat turns end with <|im_end|> too
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def model_info(path: str | os.PathLike) -> dict[str, Any]:
    """What `lmfleet info` prints: config, parameter count, dtype, size on disk."""
    directory = _model_dir(path)
    config = read_config(directory)
    files = _weight_files(directory)
    dtypes: set[str] = set()
    n_tensors = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118
                    dtypes.add(str(f.get_slice(key).get_dtype()))
                    n_tensors += 1
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    return {
        "path": str(directory),
        "architecture": config_to_hf(config)["architectures"][0],
        "parameters": config.num_params(),
        "dtype": ", ".join(sorted(dtypes)),
        "tensors": n_tensors,
        "weight_files": len(files),
        "size_bytes": size,
        "has_tokenizer": (directory / "tokenizer.json").is_file(),
        "quantization": _quantization_summary(_read_json(directory / "config.json").get("quantization_config")),
        "config": config.to_dict(),
    }


def _quantization_summary(config: Any) -> str | None:
    if not isinstance(config, dict):
        return None
    modules = config.get("modules")
    count = len(modules) if isinstance(modules, list) else "?"
    return f"{config.get('format')}: {count} linear layers, {config.get('bits')}-bit weights"


__all__ = ["load_model", "save_model", "read_config", "load_state_dict", "model_info", "parse_dtype",
           "LmfleetError"]
