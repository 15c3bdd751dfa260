"""How the engine's copy of the model multiplies by its weights: one linear method for the whole model.

`apply_linear_method(model, name)` swaps every `nn.Linear` for the chosen method's module, in
place. The methods here are dense (fp32/bf16). Layers already quantized in the model directory
(`lmfleet quantize`) run through `Int8WeightLinear` or `Int4WeightLinear` on CPU whatever the
method; elsewhere through their reference forward (dequantize, then matmul).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmfleet.errors import ConfigError


class TransposedLinear(nn.Module):
    """`x @ W^T` with W^T stored contiguous: on CPU, matrix-vector products for decode read the
    weights faster this way than through nn.Linear (see docs/engine.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


class PackedLinear(nn.Module):
    """`x @ W^T` through oneDNN with W packed once into its blocked layout (CPU, fp32); faster than
    MKL's matmul for the 8-256 row products of batched decode (see docs/engine.md)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 32):
        super().__init__()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class RowAdaptiveLinear(nn.Module):
    """The output head on CPU: a single row (batch-1 decode) reads W^T-contiguous weights, faster
    than oneDNN for a vocabulary-wide matrix-vector product; more rows use the packed weights.
    Holds the head's weights twice (fp32 CPU only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.single, self.packed = TransposedLinear(linear), PackedLinear(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single(x) if x.numel() == x.shape[-1] else self.packed(x)


class Int8WeightLinear(nn.Module):
    """A quantized layer's `x @ (q * scale)^T + b` through aten's int8 weight-only kernel
    (`_weight_int8pack_mm`). On CPU it runs with bf16 activations: there it reads the int8
    weights about 3x faster than an fp32 linear reads its weights, while with fp32 activations
    it is many times slower (measured in docs/compression.md). The output returns in x's dtype."""

    def __init__(self, layer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.compute_dtype = compute_dtype
        # A fresh copy: the kernel needs aligned memory, which a tensor read (mmap'd) straight from a
        # safetensors file need not be (it segfaulted on such an int8 matrix).
        self.register_buffer("qweight", layer.qweight.clone(memory_format=torch.contiguous_format), persistent=False)
        self.register_buffer("scales", layer.scales.to(compute_dtype), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute_dtype).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales).to(x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def _int4_scales_and_offsets(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """[in/group, out, 2]: each group's scale and the offset that turns the kernels' `(q - 8) * scale
    + offset` into our `scale * (q - zero)`, i.e. offset = scale * (8 - zero)."""
    scales = layer.scales.float()
    offsets = scales * (8 - layer.zeros.float())
    return torch.stack([scales.t(), offsets.t()], dim=-1).to(dtype).contiguous()


class Int4WeightLinear(nn.Module):
    """An int4 layer's `x @ W^T + b` through aten's CPU int4 weight-only kernel
    (`_weight_int4pack_mm_for_cpu`), with bf16 activations like `Int8WeightLinear`. The kernel
    computes each weight as `(q - 8) * scale + offset`; our `scale * (q - zero)` is that with
    `offset = scale * (8 - zero)`. The weights are repacked once into the kernel's layout."""

    def __init__(self, layer: nn.Module, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        from lmfleet.compress.quantize import unpack_int4

        self.compute_dtype, self.group_size = compute_dtype, layer.group_size
        q = unpack_int4(layer.qweight).to(torch.int32).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
        self.register_buffer("scales_and_zeros", _int4_scales_and_offsets(layer, compute_dtype), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.compute_dtype).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size,
                                                          self.scales_and_zeros).to(x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


class CudaInt4WeightLinear(nn.Module):
    """An int4 layer on CUDA through aten's tinygemm kernel (`_weight_int4pack_mm`), bf16
    activations: the same `(q - 8) * scale + offset` as on CPU, with the integers repacked into
    the CUDA layout (two values a byte, the even column in the high nibble, then tiled by
    `_convert_weight_to_int4pack`)."""

    def __init__(self, layer: nn.Module, inner_k_tiles: int):
        super().__init__()
        from lmfleet.compress.quantize import unpack_int4

        self.group_size = layer.group_size
        q = unpack_int4(layer.qweight)
        high_first = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(high_first, inner_k_tiles),
                             persistent=False)
        self.register_buffer("scales_and_zeros", _int4_scales_and_offsets(layer, torch.bfloat16), persistent=False)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group_size, self.scales_and_zeros).to(x.dtype)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out if self.bias is None else out + self.bias


def cuda_int4_inner_k_tiles(layer: nn.Module) -> int | None:
    """The tiling aten's CUDA int4 kernel takes for this layer (input a multiple of 16 x tiles,
    output a multiple of 8), or None."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or layer.out_features % 8:
        return None
    return next((t for t in (8, 4, 2) if layer.in_features % (16 * t) == 0), None)


def int8_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_kernel_fits(layer: nn.Module) -> bool:
    """aten's CPU int4 kernel takes groups of 32-256 and a multiple of 16 output rows."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and layer.out_features % 16 == 0 and \
        layer.group_size in (32, 64, 128, 256)


def quantized_kernel(layer: nn.Module, device: torch.device) -> nn.Module:
    """The engine's module for a quantized layer: a kernel where one fits (int8 and int4 on CPU,
    int4 on CUDA), else the layer's own reference forward (dequantize, then matmul)."""
    from lmfleet.compress.quantize import Int4QuantizedLinear, QuantizedLinear

    if device.type == "cuda" and isinstance(layer, Int4QuantizedLinear):
        tiles = cuda_int4_inner_k_tiles(layer)
        return layer if tiles is None else CudaInt4WeightLinear(layer, tiles)
    if device.type != "cpu":
        return layer
    if isinstance(layer, QuantizedLinear) and int8_kernel_available():
        return Int8WeightLinear(layer)
    if isinstance(layer, Int4QuantizedLinear) and int4_kernel_fits(layer):
        return Int4WeightLinear(layer)
    return layer


def packed_linears_supported(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.mkldnn.is_available() and \
        hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _packed(linear: nn.Linear, name: str) -> nn.Module:
    if not packed_linears_supported(linear.weight.dtype) or linear.weight.device.type != "cpu":
        raise ConfigError(f"linear_method='packed' needs fp32 weights on a CPU with oneDNN, not "
                          f"{linear.weight.dtype} on {linear.weight.device}")
    return RowAdaptiveLinear(linear) if name == "lm_head" else PackedLinear(linear)


def _cpu_auto(linear: nn.Linear, name: str) -> nn.Module:
    return _packed(linear, name) if packed_linears_supported(linear.weight.dtype) else TransposedLinear(linear)


METHODS: dict[str, Callable[[nn.Linear, str], nn.Module]] = {
    "dense": lambda linear, name: linear,  # nn.Linear as it is (cuBLAS on CUDA)
    "transposed": lambda linear, name: TransposedLinear(linear),
    "packed": _packed,
}


def resolve_linear_method(name: str, device: torch.device, max_rows: int | None = None) -> str:
    """'auto': the fastest dense method for the device and the largest batch of rows it will see:
    nn.Linear on CUDA; on CPU W^T-contiguous when every product is one row (a one-sequence engine:
    its matrix-vector products read the weights fastest so), else oneDNN-packed (fp32)."""
    check_linear_method(name)
    if name == "auto":
        if device.type != "cpu":
            return "dense"
        return "transposed" if max_rows == 1 else "cpu-auto"
    return name


def check_linear_method(name: str) -> None:
    if name != "auto" and name not in METHODS:
        raise ConfigError(f"linear_method={name!r} is not one of {['auto', *METHODS]}")


def apply_linear_method(model: nn.Module, method: str = "auto", max_rows: int | None = None) -> nn.Module:
    """Swap every nn.Linear of `model` (in place; the engine's own copy) for `method`'s module;
    `max_rows`: the most rows (sequences) a decode product has, if known (for 'auto')."""
    device = next(model.parameters()).device
    method = resolve_linear_method(method, device, max_rows)
    make = _cpu_auto if method == "cpu-auto" else METHODS[method]
    from lmfleet.compress.quantize import QUANTIZED_TYPES

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, make(child, child_name))
            elif isinstance(child, QUANTIZED_TYPES):
                setattr(module, child_name, quantized_kernel(child, device))
    return model
