"""Rank 0's progress bar: step, loss, tokens/s, ETA."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def training_progress(total_steps: int, start_step: int = 0) -> Iterator[Callable[[dict[str, Any]], None]]:
    console = Console(stderr=True)
    interactive = console.is_terminal
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not interactive)
    task = bar.add_task("train", total=total_steps, completed=start_step, loss="-", tps="-")
    every = max(1, total_steps // 20)

    def update(record: dict[str, Any]) -> None:
        bar.update(task, completed=record["step"], loss=f"{record['loss']:.4f}",
                   tps=f"{record['tokens_per_s']:,.0f}")
        if not interactive and (record["step"] % every == 0 or record["step"] == total_steps):
            # Plain lines for logs and CI, where a live bar cannot redraw.
            print(f"step {record['step']}/{total_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"{record['tokens_per_s']:,.0f} tok/s", file=sys.stderr, flush=True)

    with bar:
        yield update
