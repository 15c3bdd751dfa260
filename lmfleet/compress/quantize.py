"""Weight-only quantization of a model's linear layers, stored as an ordinary model directory.

int8, per output channel, symmetric: for each row `w` of a weight [out, in],
`scale = max|w| / 127` and `q = round(w / scale)` in [-127, 127]; the layer computes
`x @ (q * scale)^T + b`. In the safetensors file a quantized layer `NAME` holds `NAME.qweight`
(int8 [out, in]) and `NAME.scales` (float32 [out]) instead of `NAME.weight`; config.json names
the layers under `quantization_config` (see docs/compression.md):

    "quantization_config": {"quant_method": "lmfleet", "format": "lmfleet-int8/1", "bits": 8,
                            "group_size": null, "modules": ["layers.0.self_attn.q_proj", ...]}

`QuantizedLinear.forward` is the reference (dequantize, then an ordinary matmul); the engine
swaps it for a kernel (`lmfleet/engine/linear.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.errors import ConfigError

FORMAT_INT8 = "lmfleet-int8/1"
METHODS = ("int8",)
# The block linears; the embedding stays in floating point, the LM head too unless asked.
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales float32 [out]) with weight ~= q * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class QuantizedLinear(nn.Module):
    """A linear layer with int8 weights and one float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device: Any = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        q, scales = quantize_int8(linear.weight)
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        module.qweight, module.scales = q, scales
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def concat(cls, parts: list[QuantizedLinear]) -> QuantizedLinear:
        """One layer whose output is the parts' outputs side by side (per-channel scales concatenate)."""
        module = cls(parts[0].in_features, sum(p.out_features for p in parts), parts[0].bias is not None,
                     device="meta")
        module.qweight = torch.cat([p.qweight for p in parts])
        module.scales = torch.cat([p.scales for p in parts])
        if parts[0].bias is not None:
            module.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        return module

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.to(torch.float32) * self.scales.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the QuantizedLinear layers of `model`."""
    return [name for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]


def quantization_config(model: nn.Module, method: str) -> dict[str, Any]:
    return {"quant_method": "lmfleet", "format": FORMAT_INT8, "bits": 8, "group_size": None,
            "method": method, "modules": quantized_modules(model)}


def quantize_model(model: nn.Module, method: str = "int8", include_head: bool = False) -> nn.Module:
    """Swap every block linear of `model` (in place) for its quantized form, and the LM head too
    with `include_head` (a head tied to the embedding is untied: the embedding stays floating
    point for the lookup); returns the model."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {list(METHODS)}")
    if quantized_modules(model):
        raise ConfigError("the model is already quantized: quantize the original floating-point model")
    for block in model.layers:
        for name in BLOCK_LINEARS:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, child, QuantizedLinear.from_linear(getattr(parent, child)))
    if include_head:
        if model.config.tie_word_embeddings:
            model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        model.lm_head = QuantizedLinear.from_linear(model.lm_head)
    return model


def prepare_quantized(model: nn.Module, config: dict[str, Any], source: str) -> None:
    """Make the (meta-device) `model` take the layout a directory's `quantization_config` names."""
    if not isinstance(config, dict) or config.get("format") != FORMAT_INT8 or \
            not isinstance(config.get("modules"), list):
        raise ConfigError(f"{source}: quantization_config {config!r} is not one lmfleet reads "
                          f"(format {FORMAT_INT8!r} with a list of modules)")
    for name in config["modules"]:
        parent_name, _, child = str(name).rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
        except AttributeError:
            raise ConfigError(f"{source}: quantization_config names {name!r}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{source}: quantization_config names {name!r}, which is not a linear layer")
        setattr(parent, child, QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                               device="meta", dtype=linear.weight.dtype))
