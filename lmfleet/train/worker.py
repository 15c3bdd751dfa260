"""Worker entry point that torchrun starts: `python -m lmfleet.train.worker RUN_DIR [--resume]`."""

from __future__ import annotations

import sys
from pathlib import Path

from lmfleet.errors import LmfleetError
from lmfleet.train.config import TrainConfig
from lmfleet.train.launch import RUN_CONFIG
from lmfleet.train.trainer import run_training


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    run_dir = Path(args[0])
    config = TrainConfig.from_json(run_dir / RUN_CONFIG)
    config.validate()
    try:
        run_training(config, run_dir, resume="--resume" in args)
    except LmfleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
