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


@dataclass(frozen=True)
class ParallelDims:
    """How the launched processes divide the work: dp x tp x pp = world size.

    The device mesh is laid out (pp, dp, tp), tp innermost: a TP group is consecutive ranks (one
    node's devices, where its per-layer all-reduces are cheapest), pipeline stages outermost."""

    dp: int
    tp: int = 1
    pp: int = 1

    @classmethod
    def for_world(cls, world_size: int, tp: int = 1, pp: int = 1) -> ParallelDims:
        from lmfleet.errors import ConfigError

        if tp < 1 or pp < 1:
            raise ConfigError(f"tp={tp} and pp={pp} must be >= 1")
        if world_size % (tp * pp):
            raise ConfigError(f"world size {world_size} is not a multiple of tp x pp = {tp} x {pp} = {tp * pp}")
        return cls(world_size // (tp * pp), tp, pp)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def model_parallel(self) -> bool:
        return self.tp > 1 or self.pp > 1

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each mesh dimension."""
        return {"pp": rank // (self.dp * self.tp), "dp": rank // self.tp % self.dp, "tp": rank % self.tp}

    def build_mesh(self, device_type: str):  # noqa: ANN201 (DeviceMesh, imported late)
        """The DeviceMesh over the initialised process group, dimensions named pp, dp, tp."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))
