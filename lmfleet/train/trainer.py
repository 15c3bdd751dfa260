"""The training loop. Runs in every worker process (or in-process for a single worker)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmfleet.compress.evaluate import evaluate_perplexity
from lmfleet.data.corpus import Corpus
from lmfleet.data.loader import TokenLoader
from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.model.checkpoint import load_model, save_model
from lmfleet.model.config import ModelConfig
from lmfleet.model.transformer import Transformer, build_model
from lmfleet.parallel.mesh import DistInfo, ParallelDims, destroy_distributed, init_distributed
from lmfleet.parallel.parallelize import check_micro_batches, check_parallel, parallelize
from lmfleet.train import checkpointing as ckpt
from lmfleet.train.config import TrainConfig
from lmfleet.train.exporter import TrainingExporter
from lmfleet.train.metrics import MetricsWriter, peak_flops, peak_memory_bytes, read_metrics
from lmfleet.train.strategies import ModelParallelStrategy, Strategy, make_strategy

# Test hooks, read once at start (see fault_hook): SIGKILL rank FAULT_RANK at step FAULT_STEP, or
# SIGTERM the `lmfleet train` process during step SIGTERM_STEP; first attempt only.
FAULT_STEP_ENV = "LMFLEET_FAULT_STEP"
FAULT_RANK_ENV = "LMFLEET_FAULT_RANK"
SIGTERM_STEP_ENV = "LMFLEET_SIGTERM_STEP"


def build_model_config(config: TrainConfig, corpus: Corpus) -> ModelConfig:
    """The model of a run: flavor + overrides, vocabulary and special ids from the corpus tokenizer."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    bad = sorted(set(config.model.overrides) - known)
    if bad:
        raise ConfigError(f"unknown model setting(s) {[f'model.{k}' for k in bad]}; ModelConfig has {sorted(known)}")
    tok = corpus.tokenizer()
    fields = {"vocab_size": corpus.vocab_size, "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
              "pad_token_id": tok.pad_id, **config.model.overrides}
    model_config = ModelConfig.from_flavor(config.model.flavor, **fields)
    if model_config.vocab_size < corpus.vocab_size:
        raise ConfigError(f"model.vocab_size={model_config.vocab_size} is smaller than the corpus vocabulary "
                          f"({corpus.vocab_size})")
    if config.data.seq_len > model_config.max_position_embeddings:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds the model's max_position_embeddings="
                          f"{model_config.max_position_embeddings}")
    return model_config


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to lr * min_lr_ratio at the last step."""
    base, warmup, total = config.optim.lr, config.schedule.warmup_steps, config.train.steps
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = base * config.schedule.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases)."""
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.optim.lr, betas=(config.optim.beta1, config.optim.beta2),
                             eps=config.optim.eps)


def _all_reduce_sum(t: torch.Tensor) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0: first attempt, or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class StopRequest:
    """Set by SIGTERM; the loop reads it once per step and all ranks agree on it in the step's
    all-reduce, so every rank stops after the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def fault_hook(rank: int, stop: StopRequest) -> Callable[[int], None] | None:
    """The tests' fault injection, resolved from the environment once: None unless asked for.
    Called with the number of steps done before each step."""
    if restart_count() != 0:
        return None
    kill_at = os.environ.get(FAULT_STEP_ENV)
    kill_rank = int(os.environ.get(FAULT_RANK_ENV, "0"))
    term_at = os.environ.get(SIGTERM_STEP_ENV)
    kill_step = int(kill_at) if kill_at and rank == kill_rank else None
    term_step = int(term_at) if term_at and rank == 0 else None
    if kill_step is None and term_step is None:
        return None
    # Under torchrun the `lmfleet train` process is this worker's parent (the elastic agent).
    launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()

    def hook(done: int) -> None:
        if done == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if term_step is not None and done == term_step - 1:
            os.kill(launcher, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)  # until the launcher has passed it on to this worker

    return hook


class Trainer:
    def __init__(self, config: TrainConfig, run_dir: str | Path, info: DistInfo,
                 stop: StopRequest | None = None):
        self.config, self.run_dir, self.info = config, Path(run_dir), info
        self.stop = stop or StopRequest()
        self.before_step = fault_hook(info.rank, self.stop)
        torch.manual_seed(config.train.seed)
        # Parameters (and so gradients, optimizer state, collectives) in float64 for fp64; bf16 autocasts.
        self.param_dtype = torch.float64 if config.train.precision == "fp64" else torch.float32
        self.dims = ParallelDims.for_world(info.world_size, config.parallel.tp, config.parallel.pp)
        config.derive_grad_accum(self.dims.dp)  # the global batch is kept whatever the world size
        self.setup_data()
        model = self.build_model()
        mesh = self.dims.build_mesh(info.device.type) if self.dims.model_parallel else None
        module = parallelize(model, self.dims, mesh, info.rank, compile=config.train.compile)
        if self.dims.model_parallel:
            self.strategy: Strategy = ModelParallelStrategy(module, info, config, self.dims, mesh, self.loss)
        else:
            self.strategy = make_strategy(config.train.strategy, model, info, config)
        self.optimizer = build_optimizer(self.strategy.model, config)
        # alpha = 0 is plain cross-entropy: the teacher is not even loaded.
        self.teacher = self._teacher() if config.distill.teacher and config.distill.alpha > 0 else None
        self.teacher_id = None
        self.distill_terms: list[torch.Tensor] = []  # this step's (KL, CE) per micro-batch
        if config.distill.teacher and info.is_main:  # meta.json is rank 0's
            from lmfleet.compress.distill import teacher_identity

            self.teacher_id = teacher_identity(config.distill.teacher)
        self.loader = self.make_loader()
        self.autocast_dtype = torch.bfloat16 if config.train.precision == "bf16" else None
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=info.is_main)
        self.tokens_per_step = config.global_batch(self.dims.dp) * config.data.seq_len
        self.flops_per_token = self.model_flops_per_token()
        self.peak = peak_flops(info.device, self.autocast_dtype or self.param_dtype, config.train.peak_flops)
        self.step = 0
        self.comm_total = 0
        self.comm_calls_total = 0
        self.stop_agreed = False
        self.previous_last_step: int | None = None  # the last step a resumed run's metrics had logged

    # ---- what the model and its data are (a language model here; lmfleet.recsys.train overrides) --
    def setup_data(self) -> None:
        """Open the data and derive the model's configuration from it (`self.model_config`)."""
        self.corpus = Corpus(self.config.data.dir)
        self.model_config = build_model_config(self.config, self.corpus)
        check_parallel(self.model_config, self.dims)
        check_micro_batches(self.dims, self.config.batch.grad_accum, self.config.parallel.pp_schedule)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.model_config, seed=self.config.train.seed, device=self.info.device,
                           dtype=self.param_dtype)

    def make_loader(self) -> Any:
        """The training batches: `batch(step, micro)` -> (inputs, targets), `step`, state_dict."""
        cfg = self.config
        return TokenLoader(self.corpus, cfg.data.seq_len, cfg.batch.micro_batch, cfg.batch.grad_accum,
                           self.strategy.dp_rank, self.strategy.dp_size, cfg.train.seed)

    def model_flops_per_token(self) -> float:
        return self.model_config.flops_per_token(self.config.data.seq_len)

    def data_identity(self) -> dict[str, Any]:
        return self.corpus.identity()

    def _teacher(self) -> torch.nn.Module:
        """The frozen teacher of a distillation run, replicated or sharded as the strategy keeps models."""
        from lmfleet.compress.distill import check_teacher

        check_teacher(self.config.distill.teacher, self.model_config.vocab_size, self.corpus, self.config.data.seq_len)
        # Loaded in host memory: the strategy moves it (whole, or each rank's shard) to the device.
        teacher = load_model(self.config.distill.teacher, dtype=self.param_dtype, device="cpu")
        return self.strategy.prepare_teacher(teacher.requires_grad_(False).eval(), self.info.device)

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.teacher(inputs)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy; in a distillation run `targets` is (tokens, inputs): the teacher scores
        the inputs and the loss mixes in the KL term (`lmfleet.compress.distill`)."""
        if isinstance(targets, tuple):
            from lmfleet.compress.distill import distillation_terms

            tokens, inputs = targets  # the teacher runs here, one micro-batch's logits at a time
            temperature, alpha = self.config.distill.temperature, self.config.distill.alpha
            soft, hard = distillation_terms(logits.to(self.param_dtype), self.teacher_logits(inputs), tokens,
                                            temperature)
            self.distill_terms.append(torch.stack([soft.detach(), hard.detach()]))
            return alpha * temperature ** 2 * soft + (1 - alpha) * hard
        return F.cross_entropy(logits.to(self.param_dtype).flatten(0, 1), targets.flatten())

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ---- state -------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"world_size": self.info.world_size, "strategy": self.config.train.strategy,
                "parallel": {"dp": self.dims.dp, "tp": self.dims.tp, "pp": self.dims.pp},
                "model_config": self.model_config.to_dict(), "seq_len": self.config.data.seq_len,
                "global_batch": self.config.global_batch(self.dims.dp),
                "tokens": self.step * self.tokens_per_step, "comm_bytes_total": self.comm_total,
                "corpus": self.data_identity(), **({"teacher": self.teacher_id, "distill": {"temperature": self.config.distill.temperature,
                                                             "alpha": self.config.distill.alpha}}
                   if self.teacher_id else {})}

    def save(self, stopped_by: str | None = None) -> Path:
        local = {"loader": self.loader.state_dict(), "rng_cpu": torch.get_rng_state(),
                 "comm_total": self.comm_total, "comm_calls_total": self.comm_calls_total,
                 "strategy": self.strategy.local_state(self.optimizer)}
        if self.info.device.type == "cuda":
            local["rng_cuda"] = torch.cuda.get_rng_state(self.info.device)
        meta = {**self.meta(), **({"stopped_by": stopped_by} if stopped_by else {})}
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.info.rank,
                                    self.strategy.sharded_state(self.optimizer), local, meta,
                                    self.config.checkpoint.keep_last)
        self.metrics.note({"kind": "checkpoint", "step": self.step, "path": path.name})
        return path

    def resume(self, path: Path) -> None:
        saved_world = ckpt.read_meta(path).get("world_size")
        if self.config.train.strategy == "diloco" and saved_world != self.info.world_size:
            raise LmfleetError(f"cannot resume {path}: a DiLoCo run written by {saved_world} processes cannot go on "
                               f"with {self.info.world_size} (each rank's replica is its own)")
        sharded = self.strategy.sharded_state(self.optimizer)
        local = ckpt.load_checkpoint(path, self.info.rank, sharded,
                                     same_world=self.config.train.strategy == "diloco")
        if sharded is not None:
            self.strategy.load_sharded_state(self.optimizer, sharded)
        self.strategy.load_local_state(self.optimizer, local["strategy"])
        self.loader.load_state_dict(local["loader"])
        torch.set_rng_state(local["rng_cpu"])
        if "rng_cuda" in local and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(local["rng_cuda"], self.info.device)
        self.step = self.loader.step
        self.comm_total = int(local["comm_total"])
        self.comm_calls_total = int(local["comm_calls_total"])
        self.drop_metrics_after(self.step)

    def drop_metrics_after(self, step: int) -> None:
        """Forget metrics logged after `step` by an attempt that died: they are about to be replayed.
        The `start` record of every attempt stays."""
        if self.info.is_main:
            records = read_metrics(self.metrics.path)
            self.previous_last_step = max((r.get("step", 0) for r in records), default=0)
            kept = [r for r in records if r.get("kind") == "start" or r.get("step", 0) <= step]
            self.metrics.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    # ---- steps -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        cfg, step = self.config, self.step
        start = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = cfg.batch.grad_accum
        batches = [tuple(t.to(self.info.device, non_blocking=True) for t in self.loader.batch(step, micro))
                   for micro in range(accum)]
        if self.teacher is not None:
            batches = [(inputs, (targets, inputs)) for inputs, targets in batches]
        loss_sum = self.strategy.forward_backward(batches, self.loss, self.autocast).to(self.param_dtype)
        grad_norm = self.strategy.clip_grad_norm(cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.strategy.count_step_comm(accum)
        self.strategy.after_optimizer_step(step)
        comm, calls = self.strategy.comm.take()
        # Summed over ranks in one all-reduce: [loss, ranks asking to stop].
        loss_sum /= accum * self.strategy.loss_ranks
        reduced = torch.stack([loss_sum, torch.full_like(loss_sum, float(self.stop.requested))])
        terms = None
        if self.teacher is not None:  # the KL and cross-entropy parts, averaged like the loss
            terms = torch.stack(self.distill_terms).sum(dim=0).to(loss_sum) / (accum * self.strategy.loss_ranks)
            self.distill_terms.clear()
            reduced = torch.cat([reduced, terms])
        _all_reduce_sum(reduced)
        # One device-to-host sync per step, after the optimizer's kernels are queued.
        values = torch.cat([reduced, grad_norm.to(loss_sum)[None]]).tolist()
        loss_value, stop_votes, grad_norm_value = values[0], values[1], values[-1]
        extra = {"distill_kl": values[2], "distill_ce": values[3]} if terms is not None else {}
        self.stop_agreed = stop_votes > 0
        self.step += 1
        self.loader.step = self.step
        self.comm_total += comm
        self.comm_calls_total += calls
        elapsed = time.perf_counter() - start
        tokens_per_s = self.tokens_per_step / elapsed
        peak_total = self.peak * self.info.world_size
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm_value,
                "tokens": self.step * self.tokens_per_step, "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token * tokens_per_s / peak_total if peak_total else None,
                "step_time_s": elapsed, "peak_mem_bytes": peak_memory_bytes(self.info.device),
                "comm_bytes": comm, "comm_bytes_total": self.comm_total, "comm_calls": calls,
                "comm_calls_total": self.comm_calls_total, **extra}

    def evaluate(self) -> dict[str, Any]:
        with self.strategy.eval_weights():
            result = evaluate_perplexity(self.strategy.eval_model, self.corpus, self.config.data.seq_len,
                                         self.config.eval.tokens, rank=self.strategy.dp_rank,
                                         world_size=self.strategy.dp_size, all_reduce=self.strategy.eval_reduce,
                                         autocast_dtype=self.autocast_dtype)
        record = {"step": self.step, "tokens": self.step * self.tokens_per_step, "val_loss": result["loss"],
                  "val_perplexity": result["perplexity"], "val_tokens": result["tokens"]}
        self.metrics.write({"kind": "eval", **record})
        return record

    def final_model(self, make: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
        """The trained model, gathered whole on rank 0 into `make()`'s module (built on meta);
        None on the other ranks (which still take part in the gather)."""
        state = self.strategy.full_state_dict()
        if not self.info.is_main:
            return None
        with torch.device("meta"):
            model = make()
        model.load_state_dict(state, assign=True)
        return model

    def export(self) -> Path | None:
        """Write the final model as a Hugging Face-layout directory `RUN/final` (rank 0)."""
        model = self.final_model(lambda: Transformer(self.model_config))
        if model is None:
            return None
        model.tie_weights()
        return save_model(model, self.run_dir / "final", tokenizer=self.corpus.tokenizer())

    def fit(self, progress: Any = None) -> dict[str, Any]:
        cfg = self.config
        total = cfg.train.steps
        if self.step == 0 and cfg.eval.every:
            self.evaluate()  # the starting point of the validation curve
        while self.step < total:
            if self.before_step is not None:
                self.before_step(self.step)
            record = self.train_step()
            if self.step % cfg.train.log_every == 0 or self.step == total:
                self.metrics.write({"kind": "train", **record})
            else:
                self.metrics.note({"kind": "train", **record})  # the live /metrics sees every step
            if progress is not None:
                progress(record)
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < total:
                self.evaluate()
            if self.stop_agreed and self.step < total:
                return self.stop_here()
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total:
                self.save()
        self.strategy.finish(self.step - 1)
        comm, calls = self.strategy.comm.take()
        self.comm_total += comm
        self.comm_calls_total += calls
        last_eval = self.evaluate()
        self.save()
        final = self.export()
        return {"steps": self.step, "final_dir": str(final) if final else None, **last_eval}

    def stop_here(self) -> dict[str, Any]:
        """Every rank got here after the same step: checkpoint it and report the stop."""
        path = self.save(stopped_by="SIGTERM")
        self.metrics.write({"kind": "stop", "step": self.step, "signal": "SIGTERM", "checkpoint": path.name})
        if self.info.is_main:
            print(f"SIGTERM: stopped after step {self.step}; checkpoint {path}", file=sys.stderr, flush=True)
        return {"steps": self.step, "final_dir": None, "stopped_at": self.step, "checkpoint": str(path)}


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def run_training(config: TrainConfig, run_dir: str | Path, resume_from: str | Path | None = None,
                 show_progress: bool = True, checkpoint_on_sigterm: bool = True,
                 trainer_class: type[Trainer] = Trainer) -> dict[str, Any]:
    """Train in this process as one rank of the group torchrun set up (or alone), from checkpoint
    `resume_from` (the launcher's pick) or, after a restart, from the newest complete one. With
    `checkpoint_on_sigterm`, SIGTERM ends the run after the current step with a checkpoint."""
    stop = StopRequest()
    if checkpoint_on_sigterm:
        stop.install()
    exporter = None
    info = init_distributed()
    try:
        trainer = trainer_class(config, run_dir, info, stop)
        attempt = restart_count()
        if info.is_main:
            ckpt.remove_stale(run_dir)  # no save runs before this attempt's first barrier
        _barrier()
        selection = ckpt.Selection(Path(resume_from) if resume_from else None)
        if attempt > 0:
            selection = ckpt.select_checkpoint(run_dir)
            if info.is_main:
                print(f"restart {attempt}: {selection.describe()}", file=sys.stderr, flush=True)
        if selection.path is not None:
            trainer.resume(selection.path)
        elif attempt > 0:
            trainer.drop_metrics_after(-1)  # no checkpoint yet: the restart begins again at step 0
        if info.is_main and config.train.metrics_port:
            exporter = TrainingExporter(Path(run_dir).resolve().name, config.train.steps, info.world_size, attempt)
            # The checkpoint a restart resumes from is the run's last one, however old; before any,
            # the age counts from this start (the work a failure would lose).
            exporter.last_checkpoint_time = selection.path.stat().st_mtime if selection.path else time.time()
            if exporter.start(config.train.metrics_port, config.train.metrics_host):
                trainer.metrics.listeners.append(exporter.observe)
        trainer.metrics.write({"kind": "start", "step": trainer.step, "attempt": attempt, "pid": os.getpid(),
                               "world_size": info.world_size, "grad_accum": config.batch.grad_accum,
                               "resumed_from": selection.path.name if selection.path else None,
                               "previous_last_step": trainer.previous_last_step,
                               "skipped": {p.name: why for p, why in selection.skipped}})
        if not (show_progress and info.is_main):
            return trainer.fit()
        from lmfleet.train.progress import training_progress

        with training_progress(config.train.steps, trainer.step) as update:
            return trainer.fit(update)
    finally:
        if exporter is not None:
            exporter.close()
        destroy_distributed()
        stop.restore()
