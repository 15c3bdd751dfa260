"""Distributed training: config, loop, strategies (DDP, FSDP2, DiLoCo), checkpoints, launcher."""

from lmfleet.train.config import TrainConfig
from lmfleet.train.launch import LaunchSpec, launch

__all__ = ["LaunchSpec", "TrainConfig", "launch"]
