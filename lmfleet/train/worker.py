"""Worker entry point that torchrun starts:
`python -m lmfleet.train.worker RUN_DIR [--resume-from CHECKPOINT] [--no-checkpoint-on-sigterm]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lmfleet.errors import LmfleetError
from lmfleet.train.config import TrainConfig
from lmfleet.train.launch import RUN_CONFIG
from lmfleet.train.trainer import Trainer, run_training


def main(argv: list[str] | None = None, trainer_class: type[Trainer] = Trainer) -> int:
    """Train; returns the exit status (0, or 1 after a one-line error)."""
    parser = argparse.ArgumentParser(prog="lmfleet.train.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume-from", type=Path, default=None)
    parser.add_argument("--no-checkpoint-on-sigterm", dest="checkpoint_on_sigterm", action="store_false")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    config = TrainConfig.from_json(args.run_dir / RUN_CONFIG)
    config.validate()
    try:
        run_training(config, args.run_dir, resume_from=args.resume_from,
                     checkpoint_on_sigterm=args.checkpoint_on_sigterm, trainer_class=trainer_class)
    except LmfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def exit_after(status: int) -> None:
    # The run is done (checkpoint, export and process group all closed): leave without the C++
    # static destructors, where a gloo worker sometimes aborts ("terminate called without an
    # active exception") and so turns a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_after(main())
