"""Knowledge distillation: a student learns the teacher's next-token distributions.

`lmfleet distill TEACHER STUDENT.toml` is `lmfleet train` with `[distill] teacher` set: the
distributed trainer (its strategies, checkpoints, resume and SIGTERM handling) runs the student,
and every micro-batch also goes through the frozen teacher. The loss is

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, tokens)

(Hinton et al., 2015; the T^2 keeps the soft term's gradients on the scale of the hard one).
The teacher is replicated on every rank, or sharded like the student under FSDP.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmfleet.errors import ConfigError


def distillation_terms(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher/T || student/T), cross-entropy), each the mean over tokens; `student`,
    `teacher` [..., vocab], `targets` [...]."""
    s = student.flatten(0, -2)
    hard = F.cross_entropy(s, targets.flatten())
    t = teacher.flatten(0, -2).to(s.dtype)
    soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    log_target=True, reduction="batchmean")
    return soft, hard


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
                      alpha: float) -> torch.Tensor:
    """The mean over tokens of the loss above."""
    soft, hard = distillation_terms(student, teacher, targets, temperature)
    return alpha * temperature ** 2 * soft + (1 - alpha) * hard


def teacher_identity(teacher_dir: str | Path) -> dict[str, str]:
    """The teacher's path and a SHA-256 over its config and weight files: a resumed run must see
    the same teacher."""
    directory = Path(teacher_dir)
    digest = hashlib.sha256()
    for file in sorted(directory.glob("*.safetensors")) + [directory / "config.json"]:
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
    return {"path": str(directory), "sha256": digest.hexdigest()}


def _vocabulary(tokenizer_file: Path) -> Any:
    try:
        return json.loads(tokenizer_file.read_text())["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_teacher(teacher_dir: str | Path, student_vocab: int, corpus: Any, seq_len: int) -> dict[str, Any]:
    """Refuse a teacher the student cannot learn from; returns the teacher's config."""
    from lmfleet.model.checkpoint import _read_json, _weight_files, read_config

    directory = Path(teacher_dir)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"distill.teacher={directory} is not a model directory (no config.json)")
    raw = _read_json(directory / "config.json")
    if raw.get("quantization_config") is not None:
        raise ConfigError(f"distill.teacher={directory} is quantized: distil from the floating-point model")
    config = read_config(directory)
    _weight_files(directory)  # refuses a directory without its weights
    if seq_len > config.max_position_embeddings:
        raise ConfigError(f"data.seq_len={seq_len} exceeds the teacher's max_position_embeddings="
                          f"{config.max_position_embeddings} ({directory})")
    if config.vocab_size != student_vocab:
        raise ConfigError(f"the student's vocabulary ({student_vocab} tokens) differs from the teacher's "
                          f"({config.vocab_size}, {directory}): distillation compares their distributions token "
                          "by token, so both need the teacher's tokenizer (prepare the corpus with it)")
    teacher_vocab = _vocabulary(directory / "tokenizer.json")
    corpus_vocab = _vocabulary(corpus.path / "tokenizer.json")
    if teacher_vocab is not None and corpus_vocab is not None and teacher_vocab != corpus_vocab:
        raise ConfigError(f"the corpus {corpus.path} was tokenized with another tokenizer than the teacher "
                          f"{directory}'s: the token ids mean different things (prepare the corpus with "
                          "--tokenizer from the teacher)")
    return config.to_dict()
