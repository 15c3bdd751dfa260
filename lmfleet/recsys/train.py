"""`lmfleet recsys train`: SASRec through the same trainer, strategies, checkpoints and launcher as
the language models. `RecsysTrainer` swaps what the model and its data are; everything else (DDP,
FSDP2 with the item table sharded like every other parameter, DiLoCo, resume, SIGTERM, metrics,
progress) is `lmfleet.train`'s.

The loss averages over users: each user's mean over its positions with a target, so a micro-batch
always weighs the same whatever its users' lengths, and one process with batch 2b computes exactly
what two processes with batch b do together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmfleet.errors import ConfigError
from lmfleet.parallel.mesh import ParallelDims
from lmfleet.recsys.data import RecData, SequenceLoader, left_pad
from lmfleet.recsys.evaluate import evaluate_scorer
from lmfleet.recsys.model import SASRec, SASRecConfig, build_sasrec, save_sasrec
from lmfleet.train.config import TrainConfig
from lmfleet.train.launch import TrainTask
from lmfleet.train.trainer import Trainer

LOSSES = ("bce", "softmax")
MIN_ITEMS = 10
WORKER = "lmfleet.recsys.worker"


def sasrec_config(config: TrainConfig, data: RecData) -> SASRecConfig:
    """The model of a run: [model] settings, the catalog from the data, max_len = data.seq_len."""
    if config.model.flavor not in ("debug", "sasrec"):
        raise ConfigError(f"model.flavor={config.model.flavor!r}: a recsys run's model is SASRec; leave flavor out "
                          "or set it to 'sasrec'")
    values = dict(config.model.overrides)
    for fixed in ("num_items", "max_len"):
        if fixed in values:
            raise ConfigError(f"model.{fixed} comes from the data ({'the catalog' if fixed == 'num_items' else 'data.seq_len'}); "
                              "remove it from [model]")
    if data.num_items < MIN_ITEMS:
        raise ConfigError(f"{data.path}: {data.num_items} items; a recsys run needs at least {MIN_ITEMS} (its "
                          f"validation ranks the top {MIN_ITEMS})")
    return SASRecConfig.from_dict({**values, "num_items": data.num_items, "max_len": config.data.seq_len})


def check_recsys_config(config: TrainConfig) -> None:
    r = config.recsys
    if r.loss not in LOSSES:
        raise ConfigError(f"recsys.loss={r.loss!r} is not one of {list(LOSSES)}")
    if not isinstance(r.negatives, int) or not 1 <= r.negatives <= 1000:
        raise ConfigError(f"recsys.negatives={r.negatives!r} must be an integer in [1, 1000]")
    if not isinstance(r.eval_users, int) or r.eval_users < 0:
        raise ConfigError(f"recsys.eval_users={r.eval_users!r} must be an integer >= 0 (0: every user)")
    if config.parallel.tp > 1 or config.parallel.pp > 1:
        raise ConfigError(f"parallel.tp={config.parallel.tp}, parallel.pp={config.parallel.pp}: a recsys run is "
                          "data parallel (ddp, fsdp or diloco); its item table is sharded by fsdp")
    if config.distill.teacher:
        raise ConfigError("distill.teacher: distillation is for language models; remove [distill]")
    if config.train.compile:
        raise ConfigError("train.compile: not supported for recsys runs yet")


def recsys_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over users of each user's mean loss over its positions with a target. bce: scores
    [B, L, 1 + negatives] (positive first), targets the mask [B, L]; softmax: scores [B, L, N + 1],
    targets the next items [B, L] (0 = none)."""
    if scores.shape[:2] != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} do not match targets {tuple(targets.shape)}")
    if targets.is_floating_point():  # bce
        mask = targets.to(scores.dtype)
        per_position = -F.logsigmoid(scores[..., 0]) - F.logsigmoid(-scores[..., 1:]).sum(-1)
    else:
        mask = (targets != 0).to(scores.dtype)
        per_position = F.cross_entropy(scores.flatten(0, 1), targets.flatten(), ignore_index=0,
                                       reduction="none").view_as(mask)
    per_user = (per_position * mask).sum(1) / mask.sum(1).clamp_min(1)
    return per_user.mean()


class RecsysTrainer(Trainer):
    def setup_data(self) -> None:
        check_recsys_config(self.config)
        self.data = RecData(self.config.data.dir)
        self.model_config = sasrec_config(self.config, self.data)

    def build_model(self) -> torch.nn.Module:
        return build_sasrec(self.model_config, seed=self.config.train.seed, device=self.info.device,
                            dtype=self.param_dtype)

    def make_loader(self) -> SequenceLoader:
        cfg = self.config
        negatives = cfg.recsys.negatives if cfg.recsys.loss == "bce" else 0
        return SequenceLoader(self.data, cfg.data.seq_len, cfg.batch.micro_batch, cfg.batch.grad_accum,
                              self.strategy.dp_rank, self.strategy.dp_size, cfg.train.seed, negatives)

    def model_flops_per_token(self) -> float:
        c = self.model_config
        h = c.hidden_size
        per_layer = 4 * h * h + 2 * h * h * c.ffn_multiplier + 2 * c.max_len * h
        scoring = h * ((1 + self.config.recsys.negatives) if self.config.recsys.loss == "bce" else c.num_items + 1)
        return 6.0 * (c.num_layers * per_layer + scoring)

    def data_identity(self) -> dict[str, Any]:
        return self.data.identity()

    def loss(self, scores: torch.Tensor, targets: Any) -> torch.Tensor:
        return recsys_loss(scores.to(self.param_dtype), targets)

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation HR@10 / NDCG@10 (full ranking) and the full-softmax loss of the validation
        item, over the first recsys.eval_users users; ranks score their share, every rank runs the
        same number of forwards (FSDP's are collective), and the sums are all-reduced."""
        cfg = self.config
        users = self.data.eval_users()
        if cfg.recsys.eval_users:
            users = users[:cfg.recsys.eval_users]
        rank, world = self.strategy.dp_rank, self.strategy.dp_size
        mine = users[rank::world]
        batch = max(1, min(256, 2**25 // (self.model_config.num_items + 1)))  # [batch, N + 1] scores at a time
        rounds = math.ceil(math.ceil(len(users) / world) / batch) if len(users) else 0
        totals = torch.zeros(4, dtype=torch.float64, device=self.info.device)  # users, loss, hits, ndcg
        with self.strategy.eval_weights():
            model = self.strategy.eval_model
            was_training = model.training
            model.eval()
            for i in range(rounds):
                chunk = mine[i * batch:(i + 1) * batch]
                real = len(chunk)
                if real == 0:
                    chunk = users[:1]  # a forward all the same, counted for nothing
                cases = [self.data.case(int(u), "valid") for u in chunk]
                history = torch.stack([torch.from_numpy(left_pad(h, cfg.data.seq_len)) for h, _ in cases])
                with self.autocast():
                    scores = model(history.to(self.info.device), last_only=True).double()
                targets = torch.tensor([t for _, t in cases], device=scores.device)
                loss = F.cross_entropy(scores, targets, reduction="none")
                metrics = evaluate_scorer(lambda _h, s=scores: s, self.data, "valid", ("full",),
                                          users=np.asarray(chunk), batch_size=len(chunk))["full"]
                if real:
                    totals += torch.tensor([real, float(loss.sum()), metrics["hr@10"] * real,
                                            metrics["ndcg@10"] * real], dtype=torch.float64, device=totals.device)
            model.train(was_training)
        self.strategy.eval_reduce(totals)
        n = max(1.0, float(totals[0]))
        record = {"step": self.step, "tokens": self.step * self.tokens_per_step, "val_loss": float(totals[1]) / n,
                  "val_hr@10": float(totals[2]) / n, "val_ndcg@10": float(totals[3]) / n, "val_users": int(totals[0])}
        self.metrics.write({"kind": "eval", **record})
        return record

    def export(self) -> Path | None:
        model = self.final_model(lambda: SASRec(self.model_config))
        if model is None:
            return None
        counts = torch.from_numpy(self.data.item_counts())
        return save_sasrec(model, self.run_dir / "final", self.data.item_ids,
                           extra={"dataset": self.data.identity()}, tensors={"item_counts": counts})


class RecsysTask(TrainTask):
    worker = WORKER

    def inspect(self, config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        check_recsys_config(config)
        data = RecData(config.data.dir)
        return sasrec_config(config, data).to_dict(), data.identity()

    def check_dims(self, dims: ParallelDims) -> None:
        pass

    def run(self, config: TrainConfig, run_dir: Path, resume_from: Path | None,
            checkpoint_on_sigterm: bool) -> dict[str, Any]:
        from lmfleet.train.trainer import run_training

        return run_training(config, run_dir, resume_from=resume_from, checkpoint_on_sigterm=checkpoint_on_sigterm,
                            trainer_class=RecsysTrainer)
