"""Training metrics: JSONL on disk, MFU against a measured or declared peak, peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks (FLOP/s) by device name, from the vendors' data sheets.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12,
                 "L4": 121e12, "RTX 4090": 165e12, "B200": 2250e12}


def measure_cpu_peak_flops(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """This process's achievable matmul FLOP/s on the CPU, with its current thread count."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, declared: float | None = None) -> float:
    """Peak FLOP/s of one process's device: declared, looked up (GPU) or measured (CPU)."""
    if declared:
        return declared
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                if dtype == torch.float64:
                    break  # no table of fp64 peaks: no MFU unless train.peak_flops is given
                return value if dtype == torch.bfloat16 else value / 2
        return 0.0
    return measure_cpu_peak_flops(torch.float64 if dtype == torch.float64 else torch.float32)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # Max resident set size of this process (Linux reports KiB).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsWriter:
    """Appends one JSON object per line; only the main rank writes."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self.listeners: list[Any] = []  # called with every record written or noted (the /metrics exporter)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.note(record)

    def note(self, record: dict[str, Any]) -> None:
        """Tell the listeners of a record without writing it (e.g. a checkpoint saved)."""
        for listener in self.listeners if self.enabled else ():
            try:
                listener(record)
            except Exception as exc:  # noqa: BLE001 - a metrics consumer never stops training
                print(f"warning: a metrics listener failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records
