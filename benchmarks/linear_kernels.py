"""Weight-only linear kernels on CPU, one layer at a time: which one the engine should use.

For each matrix shape and 1 or 16 rows: fp32 (the engine's dense paths: W^T-contiguous for one
row, oneDNN-packed for more), lmfleet's int8 and int4 layers (aten's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu`, bf16 activations), and torchao's weight-only and
dynamic-activation configs when torchao imports. Each method cycles through enough copies of the
matrix to read more than three times the last-level cache per pass (memory-bound, as in decode),
and keeps its best of --rounds alternating rounds. Prints ms per product, the ratio to fp32 and
the bytes of weights read per second.

torchao is a reference here, never an lmfleet dependency: run it from its own venv,

    python -m venv /tmp/ao && /tmp/ao/bin/pip install torch==2.13.0 torchao numpy
    PYTHONPATH=. /tmp/ao/bin/python benchmarks/linear_kernels.py
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from lmfleet.compress.quantize import Int4QuantizedLinear, QuantizedLinear
from lmfleet.engine.linear import Int4WeightLinear, Int8WeightLinear, PackedLinear, TransposedLinear

CACHE_BYTES = 32 * 2**20
FP32 = "fp32 (engine's dense path)"


def weight_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    if hasattr(module, "weight") and hasattr(module.weight, "__tensor_flatten__"):  # a torchao tensor subclass
        names, _ = module.weight.__tensor_flatten__()
        tensors = [getattr(module.weight, n) for n in names]
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(layers: list[nn.Module], x: torch.Tensor, passes: int) -> float:
    """Best ms per product over `passes` passes through every copy."""
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        for layer in layers:
            layer(x)
        best = min(best, (time.perf_counter() - start) / len(layers))
    return best * 1e3


Method = tuple[Callable[[nn.Linear, int], nn.Module], torch.dtype]


def torchao_methods() -> dict[str, Method]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (
                Int4WeightOnlyConfig,
                Int8DynamicActivationInt8WeightConfig,
                Int8DynamicActivationIntxWeightConfig,
                Int8WeightOnlyConfig,
                quantize_,
            )
            from torchao.quantization.granularity import PerGroup
    except ImportError:
        return {}

    def make(config, dtype):
        def build(linear: nn.Linear, rows: int) -> nn.Module:
            holder = nn.Sequential(copy.deepcopy(linear).to(dtype))
            quantize_(holder, config)
            return holder[0]
        return build, dtype

    return {"torchao int8 weight-only (bf16)": make(Int8WeightOnlyConfig(), torch.bfloat16),
            "torchao int4 weight-only g64 (bf16)": make(Int4WeightOnlyConfig(group_size=64), torch.bfloat16),
            "torchao int8 act + int8 weight": make(Int8DynamicActivationInt8WeightConfig(), torch.float32),
            "torchao int8 act + int4 weight g64": make(
                Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(64)),
                torch.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="5632x2048,9728x896,896x4864",
                        help="out x in of each matrix (default: the issue's 2048-wide MLP and the 0.5B MLP)")
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    methods: dict[str, Method] = {
        FP32: (lambda lin, rows: TransposedLinear(lin) if rows == 1 else PackedLinear(lin), torch.float32),
        "lmfleet int8": (lambda lin, rows: Int8WeightLinear(QuantizedLinear.from_linear(lin)), torch.float32),
        "lmfleet int4 g64": (lambda lin, rows: Int4WeightLinear(Int4QuantizedLinear.from_linear(lin, 64)),
                             torch.float32),
        **torchao_methods(),
    }
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        linear = nn.Linear(in_f, out_f, bias=False)
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, in_f)
            built: dict[str, list[nn.Module]] = {}
            for name, (make, _dtype) in methods.items():
                try:
                    one = make(linear, rows)
                    copies = max(2, -(-3 * CACHE_BYTES // weight_bytes(one)))
                    built[name] = [one] + [make(linear, rows) for _ in range(copies - 1)]
                except Exception as error:  # noqa: BLE001 - a reference that does not run here is reported
                    print(f"{shape} rows={rows} {name}: does not run here ({str(error).splitlines()[0][:120]})")
            best: dict[str, float] = {}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, layers in built.items():
                        xx = x.to(methods[name][1])
                        try:
                            ms = timed(layers, xx, passes=3)
                        except Exception as error:  # noqa: BLE001
                            print(f"{shape} rows={rows} {name}: failed ({str(error).splitlines()[0][:120]})")
                            built[name] = []
                            continue
                        best[name] = min(best.get(name, float("inf")), ms)
            fp32 = best.get(FP32)
            for name, ms in best.items():
                gb_s = weight_bytes(built[name][0]) / (ms / 1e3) / 1e9
                ratio = f"{fp32 / ms:5.2f}x fp32" if fp32 else ""
                print(f"{shape:>10} rows={rows:<3} {name:<38} {ms:8.3f} ms  {ratio}  {gb_s:6.1f} GB/s")


if __name__ == "__main__":
    main()
