"""ModelConfig: one dataclass for the Llama / Qwen2 / Mistral family, and its named sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lmfleet.errors import ConfigError

MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3")


# Upper bounds on what a config.json may ask for (beyond any published model), so that a crafted
# one cannot make the loader allocate without bound before a tensor is read.
SIZE_LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "max_position_embeddings": 1 << 24}


@dataclass
class ModelConfig:
    """Shape and numerics of a decoder-only transformer; validates itself on construction."""

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # HF rope_parameters beyond the default
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    o_bias: bool = False  # Llama attention_bias also puts a bias on o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: each token attends to the last N positions
    model_type: str = "llama"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise ConfigError(f"{name}={value!r} must be a positive integer (at most {limit:,})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"num_attention_heads={self.num_attention_heads} does not divide "
                    f"hidden_size={self.hidden_size}; choose a divisor or set head_dim")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not isinstance(self.head_dim, int) or not 0 < self.head_dim <= 4096 or self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim!r} must be a positive even integer up to 4096 (RoPE "
                              "rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads={self.num_key_value_heads} must divide "
                f"num_attention_heads={self.num_attention_heads} (grouped-query attention)")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r} is not supported; use one of {sorted(MODEL_TYPES)}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps} and rope_theta={self.rope_theta} must be > 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window={self.sliding_window} must be a positive integer or None")
        self._check_biases()
        self._check_rope_scaling()

    def _check_biases(self) -> None:
        kind = self.model_type
        if kind == "llama" and self.qkv_bias != self.o_bias:
            raise ConfigError("model_type='llama' has one attention_bias for q/k/v and o; "
                              f"got qkv_bias={self.qkv_bias}, o_bias={self.o_bias} (use model_type='qwen2' "
                              "for a bias on q/k/v only)")
        if kind == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ConfigError("model_type='qwen2' has a bias on q/k/v only: set qkv_bias=True, o_bias=False, "
                              "mlp_bias=False")
        if kind == "mistral" and (self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ConfigError("model_type='mistral' has no biases: set qkv_bias, o_bias and mlp_bias to False")

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling is None:
            return
        rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported; use one of {ROPE_TYPES}")
        needed = {"linear": ["factor"],
                  "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                             "original_max_position_embeddings"]}.get(rope_type, [])
        missing = [k for k in needed if k not in self.rope_scaling]
        if missing:
            raise ConfigError(f"rope_scaling of type {rope_type!r} lacks {missing}")
        bad = [k for k in needed if isinstance(self.rope_scaling[k], bool)
               or not isinstance(self.rope_scaling[k], (int, float)) or not self.rope_scaling[k] > 0]
        if bad:
            raise ConfigError(f"rope_scaling {bad} must be positive numbers")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count computed from the shape (matches the module's)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h
        attn += (q + 2 * kv) * self.qkv_bias + h * self.o_bias
        mlp = 3 * h * self.intermediate_size + (2 * self.intermediate_size + h) * self.mlp_bias
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        total = self.num_hidden_layers * per_layer + h + head
        return total + (emb if include_embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM appendix."""
        n = self.num_params(include_embedding=False)
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6 * n + attn

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_flavor(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named size (`debug`, `tiny`, `small`), with any field overridden."""
        if name not in FLAVORS:
            raise ConfigError(f"unknown model flavor {name!r}; choose one of {sorted(FLAVORS)}")
        return cls(**{**FLAVORS[name], **overrides})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FLAVORS: dict[str, dict[str, Any]] = {
    # ~1M parameters: unit tests.
    "debug": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True),
    # ~10M parameters: the quickstart, trainable on a laptop CPU in minutes.
    "tiny": dict(vocab_size=8192, hidden_size=320, intermediate_size=864, num_hidden_layers=6,
                 num_attention_heads=5, num_key_value_heads=5, max_position_embeddings=1024,
                 tie_word_embeddings=True),
    # ~60M parameters: benchmarks.
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False),
}


# ---- Hugging Face config.json <-> ModelConfig ---------------------------------------------------

def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Read a Hugging Face `config.json` dict of a Llama, Qwen2 or Mistral model."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config.json has model_type={model_type!r}; lmfleet reads {sorted(MODEL_TYPES)}")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    rope_theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = rope if rope_type != "default" else None
    if d.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json has hidden_act={d.get('hidden_act')!r}; only 'silu' (SwiGLU) is supported")
    sliding_window = None
    if model_type == "mistral":
        sliding_window = d.get("sliding_window")
    elif model_type == "qwen2" and d.get("use_sliding_window"):
        raise ConfigError("config.json enables use_sliding_window for qwen2, which lmfleet does not support")
    attention_bias = bool(d.get("attention_bias", False))
    qkv_bias, o_bias = {"llama": (attention_bias, attention_bias), "qwen2": (True, False),
                        "mistral": (False, False)}[model_type]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim",
                                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                                "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
              if k in d and k in known}
    return ModelConfig(**kwargs, model_type=model_type, rope_theta=float(rope_theta), rope_scaling=rope_scaling,
                       qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(d.get("mlp_bias", False)),
                       sliding_window=sliding_window)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` dict that transformers (v4 and v5) loads as the matching *ForCausalLM."""
    rope_parameters = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    d: dict[str, Any] = {
        "architectures": [MODEL_TYPES[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers v4 reads these two
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope_parameters,  # transformers v5 reads this
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    if cfg.model_type == "llama":
        d["attention_bias"] = cfg.qkv_bias
        d["mlp_bias"] = cfg.mlp_bias
    elif cfg.model_type == "qwen2":
        d["use_sliding_window"] = False
        d["sliding_window"] = None
    elif cfg.model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    return d
