"""Process group set-up: gloo on CPU, NCCL on CUDA; rank/world from torchrun's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lmfleet.model.checkpoint import resolve_device


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, ...), or make a group of one.

    A group of one (a HashStore, no network) keeps every code path collective-shaped, so the
    single-process run executes the same strategies and checkpoints as the distributed one.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if resolve_device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            from torch.distributed.rendezvous import rendezvous

            store, rank, world_size = next(rendezvous("env://"))
            # torchrun keeps one store across restarts of the worker group; a fresh key space per
            # attempt stops restarted workers from dialling the addresses of the dead ones.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"lmfleet/attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    device_id=dev if backend == "nccl" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank, local_rank, world_size, dev, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
