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

With tensor or pipeline parallelism (`[parallel] tp`, `pp`) the model is split first
(lmfleet.parallel.parallelize) and `ModelParallelStrategy` all-reduces the gradients over the
mesh's data-parallel dimension only; a pipeline runs each step's micro-batches through
torch.distributed.pipelining's GPipe or 1F1B schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmfleet.model.transformer import Transformer
from lmfleet.parallel.mesh import DistInfo, ParallelDims
from lmfleet.train.config import TrainConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> mean loss


def _state_options():  # noqa: ANN202 (StateDictOptions, imported late)
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


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

    # How many ranks hold each step's loss (its sum over ranks is divided by this), and the
    # data-parallel coordinates the loader and the evaluation split their work by.
    @property
    def loss_ranks(self) -> int:
        return self.info.world_size

    @property
    def dp_rank(self) -> int:
        return self.info.rank

    @property
    def dp_size(self) -> int:
        return self.info.world_size

    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-step's forward/backward (gradient sync only on the last)."""
        return contextlib.nullcontext()

    def prepare_teacher(self, teacher: nn.Module, device: torch.device) -> nn.Module:
        """A distillation run's frozen teacher (in host memory), as this strategy keeps it on
        `device` (here: a full replica)."""
        return teacher.to(device)

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn,
                         autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        """Forward (under `autocast`) and backward of one optimizer step's micro-batches, gradients
        averaged over them; returns the sum of the micro-batch losses this rank computed."""
        losses = []
        for micro, (inputs, targets) in enumerate(batches):
            with self.micro_step(micro == len(batches) - 1):
                with autocast():
                    logits = self.model(inputs)
                loss = loss_fn(logits, targets)
                (loss / len(batches)).backward()
            losses.append(loss.detach())
        return torch.stack(losses).sum()

    @property
    def eval_model(self) -> nn.Module:
        """What evaluation calls: logits, or None on a rank that scores nothing."""
        return self.model

    def eval_reduce(self, totals: torch.Tensor) -> None:
        """Sum evaluation totals so every rank holds the whole split's."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)

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
        """State saved with torch.distributed.checkpoint (replicated or sharded), or None. The
        optimizer's state and hyper-parameters are keyed by parameter name, not by group index:
        pipeline stages hold different parameters in their groups, and any layout reads them back."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, optimizer, options=_state_options())
        return {"model": model_sd, "optim": optim_sd}

    def load_sharded_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=_state_options())

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

        self.mesh = init_device_mesh(info.device.type, (info.world_size,))
        self.fully_shard = fully_shard
        for block in model.layers:
            fully_shard(block, mesh=self.mesh)
        fully_shard(model, mesh=self.mesh)

    def prepare_teacher(self, teacher: nn.Module, device: torch.device) -> nn.Module:
        """Shard the teacher like the student: each rank moves only its 1/world to the device,
        gathered block by block in the forward and freed after it (the root too: with no backward
        it would otherwise stay gathered)."""
        for block in teacher.layers:
            self.fully_shard(block, mesh=self.mesh, reshard_after_forward=True)
        self.fully_shard(teacher, mesh=self.mesh, reshard_after_forward=True)
        return teacher

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


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _is_sharded(t: torch.Tensor) -> bool:
    return any(p.is_shard() for p in getattr(t, "placements", ()))


class ModelParallelStrategy(Strategy):
    """Tensor- or pipeline-parallel model (already split by `parallelize`), data parallel over
    the mesh's `dp` dimension: one flat all-reduce of the local gradients per optimizer step."""

    name = "ddp"

    def __init__(self, model: nn.Module, info: DistInfo, config: TrainConfig, dims: ParallelDims, mesh: Any,
                 loss_fn: LossFn):
        super().__init__(model, info, config)
        self.dims, self.mesh = dims, mesh
        self.coords = dims.coords(info.rank)
        self.dp_group = mesh["dp"].get_group()
        self.tp_group = mesh["tp"].get_group()
        self.pp_group = mesh["pp"].get_group()
        self.schedule = None
        self.is_last_stage = True
        if dims.pp > 1:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            self.is_last_stage = self.coords["pp"] == dims.pp - 1
            stage = PipelineStage(model, self.coords["pp"], dims.pp, info.device, group=self.pp_group)
            schedule_cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[config.parallel.pp_schedule]
            # scale_grads: gradients are the mean over micro-batches, as with accumulation.
            self.schedule = schedule_cls(stage, n_microbatches=config.batch.grad_accum, loss_fn=loss_fn,
                                         scale_grads=True)

    @property
    def loss_ranks(self) -> int:
        return self.dims.dp * self.dims.tp  # every TP rank holds the loss; of a pipeline, the last stage

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    @property
    def dp_size(self) -> int:
        return self.dims.dp

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]], loss_fn: LossFn,
                         autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
        if self.schedule is None:
            total = super().forward_backward(batches, loss_fn, autocast)
        else:
            inputs = torch.cat([b[0] for b in batches])
            targets = torch.cat([b[1] for b in batches])
            losses: list[torch.Tensor] = []
            with autocast():  # forwards and backwards interleave inside the schedule
                if self.coords["pp"] == 0:
                    self.schedule.step(inputs)
                elif self.is_last_stage:
                    self.schedule.step(target=targets, losses=losses)
                else:
                    self.schedule.step()
            weight = next(self.model.parameters())
            total = torch.stack(losses).detach().sum() if losses else \
                torch.zeros((), dtype=weight.dtype, device=weight.device)
        self._sync_gradients()
        return total

    def _grads(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in _unique_params(self.model) if p.grad is not None]

    def _sync_gradients(self) -> None:
        if self.dims.dp == 1:
            return
        grads = self._grads()
        flat = torch.cat([g.flatten() for g in grads])
        self.comm.add(flat)
        dist.all_reduce(flat, group=self.dp_group)
        flat /= self.dims.dp
        for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The whole model's gradient norm: TP shards' squares summed over the TP group (replicated
        gradients counted once), stages' over the pipeline; clipped as clip_grad_norm_ does."""
        params = [p for p in _unique_params(self.model) if p.grad is not None]
        square = torch.zeros((), dtype=torch.float64, device=self.info.device)
        for p in params:
            g = _local(p.grad).double()
            square += g.pow(2).sum() / (1 if _is_sharded(p.grad) else self.dims.tp)
        if self.dims.tp > 1:
            dist.all_reduce(square, group=self.tp_group)
        if self.dims.pp > 1:
            dist.all_reduce(square, group=self.pp_group)
        norm = square.sqrt()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for p in params:
                _local(p.grad).mul_(coef.to(p.grad.dtype))
        return norm

    @property
    def eval_model(self) -> nn.Module:
        if self.dims.pp == 1:
            return self.model
        from lmfleet.parallel.parallelize import PipelineForward

        return PipelineForward(self.model, self.pp_group)

    def eval_reduce(self, totals: torch.Tensor) -> None:
        # Every TP rank scored the same windows: sum over data-parallel ranks only. Of a
        # pipeline only the last stage scored: the sum over the stages is its totals.
        if self.dims.dp > 1:
            dist.all_reduce(totals, group=self.dp_group)
        if self.dims.pp > 1:
            dist.all_reduce(totals, group=self.pp_group)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors on CPU: DTensors gathered over TP, stages gathered to rank 0."""
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                 for k, v in self.model.state_dict().items()}
        if self.dims.pp == 1:
            return state
        gathered: list[Any] = [None] * self.info.world_size if self.info.rank == 0 else None
        mine = state if self.coords["dp"] == 0 and self.coords["tp"] == 0 else {}
        dist.gather_object(mine, gathered, dst=0)
        return {k: v for part in (gathered or []) for k, v in part.items()}


STRATEGY_CLASSES = {"ddp": DDPStrategy, "fsdp": FSDPStrategy, "diloco": DilocoStrategy}


def make_strategy(name: str, model: Transformer, info: DistInfo, config: TrainConfig) -> Strategy:
    return STRATEGY_CLASSES[name](model, info, config)
