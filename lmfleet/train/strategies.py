"""How gradients (or parameters) are synchronised across ranks. Each strategy wraps an unmodified
model from outside and counts the bytes it puts on the wire: the payload of every collective it
issues, measured at the call (DDP through a gradient communication hook, DiLoCo around its
all-reduce). FSDP2 issues its collectives internally; its bytes are computed from the parameter size.

- ddp:    DistributedDataParallel; one gradient all-reduce per optimizer step (no_sync on the
          micro-steps before the last).
- fsdp:   FSDP2 `fully_shard` per transformer block and at the root; parameters, gradients and
          optimizer state sharded; all-gather in forward and backward, reduce-scatter of gradients.
- diloco: every rank takes H local AdamW steps, then the outer step all-reduces the parameter
          deltas (pseudo-gradients) and applies Nesterov-momentum SGD to the shared parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmfleet.model.transformer import Transformer
from lmfleet.parallel.mesh import DistInfo
from lmfleet.train.config import TrainConfig


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in _unique_params(model))


class CommCounter:
    """Payload bytes and number of the collectives a strategy issued since the last `take()`."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def add(self, tensor: torch.Tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def take(self) -> tuple[int, int]:
        taken = (self.bytes, self.calls)
        self.bytes = self.calls = 0
        return taken


def _counted_allreduce(counter: CommCounter, bucket):  # noqa: ANN001 (DDP checks unevaluated annotations)
    """DDP's own all-reduce of one gradient bucket (divide by the world size, sum), counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    counter.add(bucket.buffer())
    return allreduce_hook(None, bucket)


def _total_norm(norm: torch.Tensor) -> torch.Tensor:
    """A plain tensor (FSDP returns a DTensor); left on the device so reading it is the caller's sync."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class Strategy:
    """Data parallel without gradient synchronisation: the base of the three strategies."""

    name = "base"

    def __init__(self, model: Transformer, info: DistInfo, config: TrainConfig):
        self.raw_model = model
        self.model: nn.Module = model
        self.info = info
        self.config = config
        self.param_bytes = _param_bytes(model)
        self.comm = CommCounter()

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward/backward (gradient sync only on the last)."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to `max_norm` (0: no clipping) and return the norm before clipping."""
        limit = max_norm if max_norm > 0 else float("inf")
        return _total_norm(torch.nn.utils.clip_grad_norm_(_unique_params(self.model), limit))

    def count_step_comm(self, grad_accum: int) -> None:
        """Add to `self.comm` what one optimizer step's gradient synchronisation sent, when the
        strategy cannot count its collectives as they run."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (0-based `step`)."""

    def finish(self, step: int) -> None:
        """Bring replicas into agreement before export."""

    # ---- state -------------------------------------------------------------------------------
    def sharded_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """State saved with torch.distributed.checkpoint (replicated or sharded), or None."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_sharded_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def local_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Per-rank state (saved by every rank in its own file)."""
        return {}

    def load_local_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        pass

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters on CPU (collective: every rank calls; rank 0 uses it)."""
        return {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Context in which `self.model` holds the weights to evaluate."""
        yield


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, model: Transformer, info: DistInfo, config: TrainConfig):
        super().__init__(model, info, config)
        if info.world_size > 1:
            self.model = DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
            self.model.register_comm_hook(self.comm, _counted_allreduce)

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        if is_last or self.info.world_size == 1:
            return contextlib.nullcontext()
        return self.model.no_sync()


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, model: Transformer, info: DistInfo, config: TrainConfig):
        super().__init__(model, info, config)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch 2.5
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(info.device.type, (info.world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def count_step_comm(self, grad_accum: int) -> None:
        if self.info.world_size == 1:
            return
        # Each micro-step all-gathers parameters for forward and again for backward; the last
        # one reduce-scatters gradients. Computed, not counted: `calls` stays 0.
        self.comm.bytes += self.param_bytes * (2 * grad_accum + 1)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class DilocoStrategy(Strategy):
    """DiLoCo (Douillard et al., 2023): local AdamW inner steps, Nesterov SGD outer steps."""

    name = "diloco"

    def __init__(self, model: Transformer, info: DistInfo, config: TrainConfig):
        super().__init__(model, info, config)
        self.inner_steps = config.diloco.inner_steps
        self.params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
        # The shared ("global") parameters every replica starts each round from.
        self.anchor = {n: p.detach().clone() for n, p in self.params.items()}
        self.momentum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.last_sync_step = -1

    def outer_step(self) -> None:
        """All-reduce the mean parameter delta and apply Nesterov momentum to the anchor."""
        lr, mu = self.config.diloco.outer_lr, self.config.diloco.outer_momentum
        with torch.no_grad():
            deltas = [self.anchor[n] - p for n, p in self.params.items()]
            if self.info.world_size > 1:
                flat = torch.cat([d.flatten() for d in deltas])
                self.comm.add(flat)
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat /= self.info.world_size
                deltas = list(torch.split(flat, [d.numel() for d in deltas]))
            for (name, p), delta in zip(self.params.items(), deltas):
                delta = delta.view_as(p)
                buf = self.momentum[name]
                buf.mul_(mu).add_(delta)
                self.anchor[name].sub_(lr * (delta + mu * buf))
                p.copy_(self.anchor[name])

    def after_optimizer_step(self, step: int) -> None:
        if (step + 1) % self.inner_steps == 0:
            self.last_sync_step = step
            self.outer_step()

    def finish(self, step: int) -> None:
        if self.last_sync_step != step:
            self.last_sync_step = step
            self.outer_step()

    def sharded_state(self, optimizer: torch.optim.Optimizer) -> None:
        return None  # replicas differ inside a round: everything is per rank

    def local_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"model": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                "optim": optimizer.state_dict(), "anchor": {n: t.cpu() for n, t in self.anchor.items()},
                "momentum": {n: t.cpu() for n, t in self.momentum.items()}, "last_sync_step": self.last_sync_step}

    def load_local_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state["model"][name])
                self.anchor[name].copy_(state["anchor"][name])
                self.momentum[name].copy_(state["momentum"][name])
        optimizer.load_state_dict(state["optim"])
        self.last_sync_step = int(state["last_sync_step"])

    @contextlib.contextmanager
    def eval_weights(self) -> Iterator[None]:
        """Evaluate the shared parameters, not this replica's drift inside the round."""
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.anchor[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])


STRATEGY_CLASSES = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "diloco": DilocoStrategy}


def make_strategy(name: str, model: Transformer, info: DistInfo, config: TrainConfig) -> Strategy:
    return STRATEGY_CLASSES[name](model, info, config)
