"""Weight-only quantization of a model's linear layers, stored as an ordinary model directory.

Two formats (the tensors and config.json keys are documented in docs/compression.md):

- int8, per output channel, symmetric: for each row `w` of a weight [out, in],
  `scale = max|w| / 127` and `q = round(w / scale)` in [-127, 127]; the layer computes
  `x @ (q * scale)^T + b`. A quantized layer `NAME` holds `NAME.qweight` (int8 [out, in]) and
  `NAME.scales` (float32 [out]) instead of `NAME.weight`.
- int4, per group of `group_size` consecutive input columns, asymmetric: for each row and group,
  `w ~= scale * (q - zero)` with q and zero in [0, 15]. `NAME.qweight` (uint8 [out, in/2], two
  values a byte, the even column in the low nibble), `NAME.scales` (float32 [out, in/group]),
  `NAME.zeros` (uint8 [out, in/group]).

config.json names the layers under `quantization_config`:

    "quantization_config": {"quant_method": "lmfleet", "format": "lmfleet-int4/1", "bits": 4,
                            "group_size": 64, "method": "int4", "calibration": "gptq",
                            "modules": ["layers.0.self_attn.q_proj", ...]}

The layers' `forward` is the reference (dequantize, then an ordinary matmul); the engine swaps
it for a kernel (`lmfleet/engine/linear.py`). Calibrated int4 (GPTQ, AWQ) chooses the integers
differently and stores them in the same layout (`lmfleet/compress/calibrate.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.errors import ConfigError

FORMAT_INT8 = "lmfleet-int8/1"
FORMAT_INT4 = "lmfleet-int4/1"
METHODS = ("int8", "int4")
CALIBRATIONS = ("none", "gptq", "awq")
# The group sizes the int4 kernels take (aten's CPU kernel: 32, 64, 128 or 256).
GROUP_SIZES = (32, 64, 128, 256)
# The block linears; the embedding stays in floating point, the LM head too unless asked.
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales float32 [out]) with weight ~= q * scales[:, None]."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def int4_params(w: torch.Tensor, clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit (scale, zero) for each row of `w` [rows, cols] over all its columns: the
    range [min(w, 0), max(w, 0)] (shrunk by `clip` in (0, 1], one per row, where given) maps onto
    0..15 (zero is an integer, so 0.0 is exact)."""
    lo = w.amin(dim=-1).clamp(max=0)
    hi = w.amax(dim=-1).clamp(min=0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale, zero


def int4_round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The integers 0..15 (float) nearest `w / scale + zero`; `scale`, `zero` broadcast over w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 15)


def quantize_int4(weight: torch.Tensor, group_size: int,
                  clip: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round to nearest: (q uint8 [out, in] in 0..15, scales float32 [out, in/group], zeros uint8
    [out, in/group]) with weight ~= scales * (q - zeros) within each group; `clip` [out, in/group]
    shrinks each group's range (weights beyond it saturate)."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    scale, zero = int4_params(w, clip)
    q = int4_round(w, scale[..., None], zero[..., None])
    return q.reshape(out_f, in_f).to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in] from q (0..15) [out, in], scales and zeros [out, in/group]."""
    out_f, in_f = q.shape
    w = (q.float().reshape(out_f, -1, group_size) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.reshape(out_f, in_f)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] (values 0..15) -> uint8 [out, in/2], column 2j in the low nibble of byte j."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [out, in] in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _bias(linear: nn.Module) -> nn.Parameter | None:
    return None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


class QuantizedLinear(nn.Module):
    """A linear layer with int8 weights and one float scale per output channel."""

    bits = 8

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
        module.qweight, module.scales, module.bias = q, scales, _bias(linear)
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


class Int4QuantizedLinear(nn.Module):
    """A linear layer with 4-bit weights, a float scale and an integer zero point per group of
    `group_size` input columns of each output row."""

    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, device: Any = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if in_features % group_size or in_features % 2:
            raise ConfigError(f"group size {group_size} does not divide the layer's input size {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_quantized(cls, linear: nn.Module, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       group_size: int) -> Int4QuantizedLinear:
        """The layer for `linear` holding the given integers (uint8 [out, in] in 0..15), scales and zeros."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, device="meta")
        module.qweight = pack_int4(q)
        module.scales, module.zeros = scales.float().contiguous(), zeros.to(torch.uint8).contiguous()
        module.bias = _bias(linear)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4QuantizedLinear:
        return cls.from_quantized(linear, *quantize_int4(linear.weight, group_size), group_size)

    @classmethod
    def concat(cls, parts: list[Int4QuantizedLinear]) -> Int4QuantizedLinear:
        """One layer whose output is the parts' outputs side by side (rows and their groups concatenate)."""
        module = cls(parts[0].in_features, sum(p.out_features for p in parts), parts[0].bias is not None,
                     parts[0].group_size, device="meta")
        for name in ("qweight", "scales", "zeros"):
            setattr(module, name, torch.cat([getattr(p, name) for p in parts]))
        if parts[0].bias is not None:
            module.bias = nn.Parameter(torch.cat([p.bias.detach() for p in parts]), requires_grad=False)
        return module

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_int4(unpack_int4(self.qweight), self.scales, self.zeros, self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 groups of {self.group_size}")


QUANTIZED_TYPES = (QuantizedLinear, Int4QuantizedLinear)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the quantized layers of `model`."""
    return [name for name, module in model.named_modules() if isinstance(module, QUANTIZED_TYPES)]


def quantization_config(model: nn.Module, method: str, group_size: int | None = None,
                        calibration: str = "none") -> dict[str, Any]:
    int4 = method == "int4"
    return {"quant_method": "lmfleet", "format": FORMAT_INT4 if int4 else FORMAT_INT8, "bits": 4 if int4 else 8,
            "group_size": group_size if int4 else None, "method": method, "calibration": calibration,
            "modules": quantized_modules(model)}


def target_linears(model: nn.Module, include_head: bool) -> list[str]:
    """The names of the layers `quantize_model` rewrites."""
    names = [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in BLOCK_LINEARS]
    return [*names, "lm_head"] if include_head else names


def check_quantize(model: nn.Module, method: str, group_size: int | None, include_head: bool) -> None:
    """Everything `quantize_model` would refuse, before any work is done."""
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {list(METHODS)}")
    if quantized_modules(model):
        raise ConfigError("the model is already quantized: quantize the original floating-point model")
    if method != "int4":
        return
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size} is not one of {list(GROUP_SIZES)}")
    for name in target_linears(model, include_head):
        in_features = model.get_submodule(name).in_features
        if in_features % group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            raise ConfigError(f"--group-size {group_size} does not divide the input size {in_features} of {name}"
                              + (f"; choose one of {fits}" if fits else ""))


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own weights (a tied head is untied; the embedding stays as it is)."""
    if model.config.tie_word_embeddings:
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)


def replace_linear(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, method: str = "int8", include_head: bool = False,
                   group_size: int | None = None) -> nn.Module:
    """Swap every block linear of `model` (in place) for its round-to-nearest quantized form, and
    the LM head too with `include_head` (a head tied to the embedding is untied: the embedding
    stays floating point for the lookup); returns the model."""
    check_quantize(model, method, group_size, include_head)
    if include_head:
        untie_head(model)
    for name in target_linears(model, include_head):
        linear = model.get_submodule(name)
        layer = Int4QuantizedLinear.from_linear(linear, group_size) if method == "int4" \
            else QuantizedLinear.from_linear(linear)
        replace_linear(model, name, layer)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every quantized layer back for an nn.Linear holding its rounded weights (in place)."""
    for name in quantized_modules(model):
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.dequantized(torch.float32), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        replace_linear(model, name, linear)
    return model


def prepare_quantized(model: nn.Module, config: dict[str, Any], source: str) -> None:
    """Make the (meta-device) `model` take the layout a directory's `quantization_config` names."""
    formats = (FORMAT_INT8, FORMAT_INT4)
    if not isinstance(config, dict) or config.get("format") not in formats or \
            not isinstance(config.get("modules"), list):
        raise ConfigError(f"{source}: quantization_config {config!r} is not one lmfleet reads "
                          f"(format one of {list(formats)} with a list of modules)")
    group_size = config.get("group_size")
    if config["format"] == FORMAT_INT4 and (type(group_size) is not int or group_size not in GROUP_SIZES):
        raise ConfigError(f"{source}: quantization_config group_size {group_size!r} is not one of {list(GROUP_SIZES)}")
    names = [str(name) for name in config["modules"]]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: quantization_config lists a layer twice")
    listed = set(names)
    for i in range(len(model.layers)):  # layers the engine fuses are quantized together or not at all
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            count = sum(f"layers.{i}.{n}" in listed for n in group)
            if 0 < count < len(group):
                raise ConfigError(f"{source}: quantization_config quantizes only some of layers.{i}."
                                  f"{{{', '.join(n.split('.')[-1] for n in group)}}}: all of them or none")
    if "lm_head" in listed and model.config.tie_word_embeddings:
        raise ConfigError(f"{source}: quantization_config quantizes lm_head, which is tied to the embedding "
                          "(tie_word_embeddings must be false)")
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"{source}: quantization_config names {name!r}, which the model does not have") from None
        if not isinstance(linear, nn.Linear):
            raise ConfigError(f"{source}: quantization_config names {name!r}, which is not a linear layer")
        bias, dtype = linear.bias is not None, linear.weight.dtype
        if config["format"] == FORMAT_INT4:
            if linear.in_features % group_size:
                raise ConfigError(f"{source}: group_size {group_size} does not divide the input size "
                                  f"{linear.in_features} of {name}")
            layer = Int4QuantizedLinear(linear.in_features, linear.out_features, bias, group_size, "meta", dtype)
        else:
            layer = QuantizedLinear(linear.in_features, linear.out_features, bias, "meta", dtype)
        replace_linear(model, name, layer)


def check_quantized_values(model: nn.Module, source: str) -> None:
    """Refuse stored integers and scales no quantizer writes (zero points above 15, scales not
    finite or not positive): they would run, giving garbage."""
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANTIZED_TYPES):
            continue
        scales = layer.scales
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise ConfigError(f"{source}: {name}.scales holds values that are not finite and >= 0")
        if isinstance(layer, Int4QuantizedLinear) and int(layer.zeros.max()) > 15:
            raise ConfigError(f"{source}: {name}.zeros holds values above 15 (4-bit zero points are 0..15)")
