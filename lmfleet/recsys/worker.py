"""Worker entry point that torchrun starts for `lmfleet recsys train` (as `lmfleet.train.worker`
is for language models): `python -m lmfleet.recsys.worker RUN_DIR [--resume-from CHECKPOINT]`."""

from lmfleet.recsys.train import RecsysTrainer
from lmfleet.train.worker import exit_after, main

if __name__ == "__main__":
    exit_after(main(trainer_class=RecsysTrainer))
