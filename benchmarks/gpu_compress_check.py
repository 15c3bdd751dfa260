"""CUDA check of the quantized layers (run where a GPU is lent): aten's int4 kernel against the
reference layer, and batch-1 / batch-16 decode of int4 against bf16 in the engine.

    python benchmarks/gpu_compress_check.py --json runs/gpu_compress.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmfleet.compress.quantize import Int4QuantizedLinear
from lmfleet.engine import LLMEngine
from lmfleet.engine.bench import decode_speed
from lmfleet.engine.linear import CudaInt4WeightLinear, cuda_int4_inner_k_tiles
from lmfleet.model import ModelConfig, build_model, save_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    result: dict = {"device": torch.cuda.get_device_name()}
    linear = torch.nn.Linear(2048, 5632, bias=False)
    layer = Int4QuantizedLinear.from_linear(linear, 64)
    x = torch.randn(16, 2048)
    with torch.no_grad():
        reference = layer(x)
        kernel = CudaInt4WeightLinear(layer.cuda(), cuda_int4_inner_k_tiles(layer))(x.cuda()).float().cpu()
    result["int4_kernel_rel_error"] = ((kernel - reference).norm() / reference.norm()).item()
    with tempfile.TemporaryDirectory() as tmp:
        fp = Path(tmp) / "fp"
        save_model(build_model(ModelConfig.from_flavor(args.flavor), seed=0), fp)
        subprocess.run([str(Path(sys.executable).with_name("lmfleet")), "quantize", str(fp), "--out",
                        str(Path(tmp) / "int4"), "--method", "int4", "--include-head"], check=True)
        for name, directory in (("bf16", fp), ("int4", Path(tmp) / "int4")):
            for batch in (1, 16):
                engine = LLMEngine(directory, dtype="bf16", device="cuda", max_num_seqs=batch,
                                   kv_cache_memory=256 * 2**20)
                result[f"{name}_tok_s_b{batch}"] = decode_speed(engine, batch, tokens=64)
                del engine
                torch.cuda.empty_cache()
    print(json.dumps(result, indent=2))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
