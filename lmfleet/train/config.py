"""TrainConfig: a TOML file of sections, each a validated dataclass; `--set section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmfleet.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STRATEGIES = ("ddp", "fsdp", "diloco")
PP_SCHEDULES = ("1f1b", "gpipe")
# fp64: parameters, gradients, optimizer state and the loss in float64 (runs that must agree to
# rounding whatever the CPU's kernels, e.g. DDP against one process); bf16: autocast over fp32 weights.
PRECISIONS = ("fp32", "bf16", "fp64")


@dataclass
class ModelSection:
    flavor: str = "debug"
    # Any ModelConfig field, e.g. num_hidden_layers = 2; vocab_size comes from the corpus.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    dir: str = ""
    seq_len: int = 256


@dataclass
class BatchSection:
    micro_batch: int = 8  # sequences per rank per forward/backward
    grad_accum: int = 1  # micro-steps per optimizer step
    # Sequences per optimizer step over all ranks; when set, grad_accum is derived from it.
    global_batch: int | None = None


@dataclass
class OptimSection:
    lr: float = 3e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ScheduleSection:
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step


@dataclass
class TrainSection:
    steps: int = 100
    seed: int = 0
    precision: str = "fp32"
    compile: bool = False
    strategy: str = "ddp"
    out_dir: str = "runs/train"
    log_every: int = 1
    peak_flops: float | None = None  # per process, for MFU; measured when not given
    metrics_port: int = 0  # rank 0 serves Prometheus /metrics on it during the run (0: off)
    metrics_host: str = "127.0.0.1"


@dataclass
class EvalSection:
    every: int = 50  # 0 disables periodic evaluation (the final one still runs)
    tokens: int = 65536  # validation tokens per evaluation


@dataclass
class CheckpointSection:
    every: int = 50  # 0: only at the end
    keep_last: int = 2


@dataclass
class DilocoSection:
    inner_steps: int = 10  # H: local AdamW steps between outer synchronisations
    outer_lr: float = 0.7
    outer_momentum: float = 0.9


@dataclass
class ParallelSection:
    # Model-parallel degrees; data parallelism takes the rest: dp = world size / (tp * pp).
    tp: int = 1  # tensor parallel: q/k/v, gate/up split by output, o/down by input features
    pp: int = 1  # pipeline parallel: stages of consecutive layers, micro-batches = batch.grad_accum
    pp_schedule: str = "1f1b"  # or "gpipe"


def _check_type(name: str, value: Any, section_cls: type, key: str) -> Any:
    """Values must have the type of the field's default (ints are accepted for floats)."""
    default = next(f for f in dataclasses.fields(section_cls) if f.name == key).default
    if default is None or default is dataclasses.MISSING:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        raise ConfigError(f"{name}={value!r} must be a number")
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{name}={value!r} must be of type {type(default).__name__}")
    return value


@dataclass
class DistillSection:
    # A teacher model directory: the run trains its model (the student) on the teacher's soft
    # targets as well as the data (`lmfleet distill`); empty: ordinary training.
    teacher: str = ""
    temperature: float = 1.0  # softmax temperature of both distributions in the KL term
    alpha: float = 0.5  # loss = alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy


@dataclass
class RecsysSection:
    # `lmfleet recsys train` only (a SASRec run; [model] holds SASRec settings, data.seq_len is
    # the history length it reads).
    loss: str = "bce"  # "bce": each next item against `negatives` sampled ones; "softmax": over every item
    negatives: int = 1  # sampled negatives per position (bce)
    eval_users: int = 2048  # validation users scored by each periodic evaluation (0: all)


SECTIONS = {"model": ModelSection, "data": DataSection, "batch": BatchSection, "optim": OptimSection,
            "schedule": ScheduleSection, "train": TrainSection, "eval": EvalSection,
            "checkpoint": CheckpointSection, "diloco": DilocoSection, "parallel": ParallelSection,
            "distill": DistillSection, "recsys": RecsysSection}


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    diloco: DilocoSection = field(default_factory=DilocoSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    distill: DistillSection = field(default_factory=DistillSection)
    recsys: RecsysSection = field(default_factory=RecsysSection)

    def validate(self, world_size: int | None = None) -> None:
        """Check every value; with `world_size`, also derive and check the batch split."""
        positive = [("data.seq_len", self.data.seq_len), ("batch.micro_batch", self.batch.micro_batch),
                    ("batch.grad_accum", self.batch.grad_accum), ("train.steps", self.train.steps),
                    ("train.log_every", self.train.log_every), ("eval.tokens", self.eval.tokens),
                    ("checkpoint.keep_last", self.checkpoint.keep_last),
                    ("diloco.inner_steps", self.diloco.inner_steps), ("parallel.tp", self.parallel.tp),
                    ("parallel.pp", self.parallel.pp)]
        for name, value in positive:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        for name, value in [("eval.every", self.eval.every), ("checkpoint.every", self.checkpoint.every),
                            ("schedule.warmup_steps", self.schedule.warmup_steps), ("train.seed", self.train.seed)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}={value!r} must be an integer >= 0")
        port = self.train.metrics_port
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ConfigError(f"train.metrics_port={port!r} must be a TCP port (1-65535), or 0 for none")
        if not isinstance(self.train.metrics_host, str) or not self.train.metrics_host:
            raise ConfigError(f"train.metrics_host={self.train.metrics_host!r} must be an address to listen on")
        if self.optim.lr <= 0 or self.diloco.outer_lr <= 0:
            raise ConfigError(f"optim.lr={self.optim.lr} and diloco.outer_lr={self.diloco.outer_lr} must be > 0")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio={self.schedule.min_lr_ratio} must be in [0, 1]")
        if not (0 <= self.optim.beta1 < 1 and 0 <= self.optim.beta2 < 1):
            raise ConfigError(f"optim.beta1={self.optim.beta1}, optim.beta2={self.optim.beta2} must be in [0, 1)")
        if self.optim.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={self.optim.grad_clip} must be >= 0 (0 disables clipping)")
        if self.train.strategy not in STRATEGIES:
            raise ConfigError(f"train.strategy={self.train.strategy!r} is not one of {list(STRATEGIES)}")
        if self.train.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.train.precision!r} is not one of {list(PRECISIONS)}")
        if self.parallel.pp_schedule not in PP_SCHEDULES:
            raise ConfigError(f"parallel.pp_schedule={self.parallel.pp_schedule!r} is not one of {list(PP_SCHEDULES)}")
        if self.parallel.tp > 1 and self.parallel.pp > 1:
            raise ConfigError(f"parallel.tp={self.parallel.tp} with parallel.pp={self.parallel.pp}: tensor and pipeline "
                              "parallelism are not combined yet; use one of them (each combines with data parallel)")
        if (self.parallel.tp > 1 or self.parallel.pp > 1) and self.train.strategy != "ddp":
            raise ConfigError(f"train.strategy={self.train.strategy!r} with parallel.tp={self.parallel.tp}, "
                              f"parallel.pp={self.parallel.pp}: model parallelism runs with strategy 'ddp' "
                              "(gradients all-reduced over the data-parallel ranks)")
        if not 0 < self.distill.temperature < float("inf") or not 0 <= self.distill.alpha <= 1:
            raise ConfigError(f"distill.temperature={self.distill.temperature} must be > 0 and "
                              f"distill.alpha={self.distill.alpha} in [0, 1]")
        if self.distill.teacher and (self.parallel.tp > 1 or self.parallel.pp > 1):
            raise ConfigError(f"distillation with parallel.tp={self.parallel.tp}, parallel.pp={self.parallel.pp} is "
                              "not supported yet: distil with strategy ddp, fsdp or diloco")
        if not self.data.dir:
            raise ConfigError("data.dir is empty: give the corpus directory (--data DIR or [data] dir = ...)")
        if world_size is not None:
            self.derive_grad_accum(self.dp_degree(world_size))

    def dp_degree(self, world_size: int) -> int:
        """Data-parallel ranks of a run on `world_size` processes: what tp x pp leaves."""
        model_parallel = self.parallel.tp * self.parallel.pp
        if world_size % model_parallel:
            raise ConfigError(f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = "
                              f"{self.parallel.tp} x {self.parallel.pp} = {model_parallel}")
        return world_size // model_parallel

    def derive_grad_accum(self, dp: int) -> int:
        """grad_accum from global_batch when given: global = micro_batch * grad_accum * dp."""
        if self.batch.global_batch is None:
            return self.batch.grad_accum
        per_step = self.batch.micro_batch * dp
        if self.batch.global_batch % per_step:
            raise ConfigError(f"batch.global_batch={self.batch.global_batch} is not a multiple of "
                              f"micro_batch {self.batch.micro_batch} x data-parallel ranks {dp} = {per_step}")
        self.batch.grad_accum = self.batch.global_batch // per_step
        return self.batch.grad_accum

    def global_batch(self, dp: int) -> int:
        """Sequences per optimizer step over the `dp` data-parallel ranks."""
        return self.batch.micro_batch * self.batch.grad_accum * dp

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = dict(raw.get(name, {}))
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{name}] must be a table")
            if name == "model":
                flavor = values.pop("flavor", "debug")
                extra = values.pop("overrides", {})
                sections[name] = ModelSection(flavor=flavor, overrides={**extra, **values})
                continue
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = sorted(set(values) - known)
            if bad:
                raise ConfigError(f"{source}: unknown key(s) {[f'{name}.{k}' for k in bad]}; "
                                  f"[{name}] takes {sorted(known)}")
            sections[name] = section_cls(**{k: _check_type(f"{name}.{k}", v, section_cls, k)
                                            for k, v in values.items()})
        return cls(**sections)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    def apply_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """`section.key=value` overrides (e.g. optim.lr=1e-3, model.num_hidden_layers=2)."""
        raw = self.to_dict()
        for dotted, value in overrides.items():
            if "." not in dotted:
                raise ConfigError(f"--set {dotted}=...: use section.key, e.g. optim.lr or train.steps")
            section, key = dotted.split(".", 1)
            if section not in SECTIONS:
                raise ConfigError(f"--set {dotted}: unknown section {section!r}; known: {sorted(SECTIONS)}")
            if section == "model" and key != "flavor":
                raw["model"]["overrides"][key] = value
            else:
                raw[section][key] = value
        return TrainConfig.from_dict(raw, source="--set")
