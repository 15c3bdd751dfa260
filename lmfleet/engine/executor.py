"""Where a step's model work runs: in this process (`ModelRunner` alone), or on `tensor_parallel_size`
processes that each hold a slice of the weights and of the KV cache (`TPExecutor`).

Tensor parallel: this process is rank 0. It schedules and samples as with one process; for each
step it broadcasts the step's metadata (plain lists) to the workers, and every rank runs the same
step on its slice: the row-parallel layers' all-reduces join the ranks' partial results inside the
forward, and rank 0 ends with the whole logits. Workers are started with `spawn` and leave within
half a second of this process however it ends; and a worker that dies makes
the next step fail with `ExecutorDied`, which ends the engine (a server then exits non-zero).
"""

from __future__ import annotations

import datetime
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmfleet.engine.runner import ModelRunner
from lmfleet.engine.step import StepMetadata
from lmfleet.errors import ConfigError
from lmfleet.model.transformer import Transformer
from lmfleet.parallel.tensor_parallel import TPLayout, shard_for_inference

START_TIMEOUT_S = 300.0  # workers loading and slicing their weights
COLLECTIVE_TIMEOUT_S = 120.0  # a rank that stops answering inside a step


class ExecutorDied(RuntimeError):
    """A tensor-parallel worker is gone: no further step can run."""


def _watch_parent(parent: int) -> None:
    """Leave once the parent is gone, however it ended (polled: Linux's parent-death signal follows
    the thread that started the process, and the engine is often built on a thread that ends)."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(0.5)

    threading.Thread(target=watch, name="lmfleet-tp-parent", daemon=True).start()


def _init_group(rank: int, tp: int, store_path: str, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=tp,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            device_id=device if backend == "nccl" else None)


def _runner(model: Transformer, tp: int, rank: int, runner_kwargs: dict[str, Any],
            device: torch.device) -> tuple[ModelRunner, TPLayout]:
    """Slice the whole model where it is (host memory), then move only this rank's slice to `device`."""
    layout = shard_for_inference(model, tp, rank)
    return ModelRunner(model.to(device), kv_heads=layout.kv_heads, **runner_kwargs), layout


def _worker(rank: int, tp: int, parent: int, store_path: str, source: str | Transformer, dtype: Any, device: str,
            threads: int, runner_kwargs: dict[str, Any], ready: Any) -> None:
    """A TP rank > 0: load (a model directory) or take (a model shared by rank 0) the whole model,
    slice it, then run every step rank 0 broadcasts until told to stop."""
    _watch_parent(parent)
    torch.set_num_threads(threads)
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        _init_group(rank, tp, store_path, dev)
        if isinstance(source, Transformer):
            model = source
        else:
            from lmfleet.model.checkpoint import load_model

            model = load_model(source, dtype=dtype, device="cpu")
        del source
        runner, _ = _runner(model, tp, rank, runner_kwargs, dev)
        del model
        ready.put(rank)
        box: list[Any] = [None]
        while True:
            dist.broadcast_object_list(box, src=0)
            if box[0] is None:
                break
            runner.execute(box[0])
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the engine
        ready.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        sys.stderr.write(f"error: tensor-parallel rank {rank}: {exc}\n")
        os._exit(1)
    # Leave without C++ static destructors: a gloo process sometimes aborts in them at exit.
    os._exit(0)


class TPExecutor:
    """Rank 0 of `tp` ranks (this process) and the `tp - 1` worker processes."""

    def __init__(self, model: Transformer, tp: int, runner_kwargs: dict[str, Any],
                 model_dir: str | Path | None = None, dtype: Any = None, device: torch.device | None = None):
        """`model`: rank 0's whole copy, best in host memory (sliced here in place; only the slice
        goes to `device`). Workers load `model_dir` themselves when given, else receive `model`
        through shared memory; each moves only its own slice to its device."""
        if dist.is_initialized():
            raise ConfigError("tensor_parallel_size > 1 starts its own process group: this process already "
                              "belongs to one (run the engine in a process of its own)")
        self.tp = tp
        device = device or model.embed_tokens.weight.device
        if device.type == "cuda":
            first = device.index or 0
            if first + tp > torch.cuda.device_count():
                raise ConfigError(f"tensor_parallel_size={tp} from cuda:{first} needs {first + tp} GPUs; "
                                  f"{torch.cuda.device_count()} are visible")
        self._dir = tempfile.mkdtemp(prefix="lmfleet-tp-")
        store = str(Path(self._dir) / "store")
        threads = max(1, torch.get_num_threads() // tp)
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        source: str | Transformer = str(model_dir) if model_dir is not None else \
            (model.to("cpu") if device.type == "cuda" else model)
        # Rank 0 slices `model` in place: its whole weights stay referenced until every worker has them.
        pinned = list(model.state_dict().values()) if model_dir is None else []
        self.workers = []
        for rank in range(1, tp):
            worker_device = f"cuda:{device.index + rank if device.index is not None else rank}" \
                if device.type == "cuda" else "cpu"
            proc = ctx.Process(target=_worker, name=f"lmfleet-tp-{rank}", daemon=True,
                               args=(rank, tp, os.getpid(), store, source, dtype, worker_device, threads,
                                     runner_kwargs, ready))
            proc.start()
            self.workers.append(proc)
        self._dead: str | None = None
        self._stopped = False
        self._in_step = False
        try:
            torch.set_num_threads(threads)
            _init_group(0, tp, store, device)
            self.runner, self.layout = _runner(model, tp, 0, runner_kwargs, device)
            deadline = time.monotonic() + START_TIMEOUT_S
            for _ in self.workers:
                answer = self._next_ready(ready, deadline)
                if not isinstance(answer, int):
                    raise ExecutorDied(f"a tensor-parallel worker failed to start: {answer}")
            del pinned, source
        except BaseException:
            self.shutdown()
            raise

    def _next_ready(self, ready: Any, deadline: float) -> Any:
        """The next worker's start-up answer; a worker that died without one (the OOM killer)
        or a start that takes past the deadline is an ExecutorDied naming it."""
        while True:
            try:
                return ready.get(timeout=0.5)
            except queue.Empty:
                pass
            for proc in self.workers:
                if not proc.is_alive():
                    return f"{proc.name} (pid {proc.pid}) exited with {proc.exitcode} while loading"
            if time.monotonic() > deadline:
                return f"not ready after {START_TIMEOUT_S:.0f} s"

    @property
    def sort_decodes(self) -> bool:
        return self.runner.sort_decodes

    def capture_graphs(self) -> None:
        self.runner.capture_graphs()

    def _check_workers(self) -> None:
        if self._dead is None:
            for proc in self.workers:
                if not proc.is_alive():
                    self._dead = f"tensor-parallel worker {proc.name} (pid {proc.pid}) exited with {proc.exitcode}"
        if self._dead is not None:
            raise ExecutorDied(self._dead)

    def execute(self, meta: StepMetadata) -> torch.Tensor:
        """One step on every rank. Any failure is the engine's end (ExecutorDied): once the step is
        sent the workers are inside its collectives, and a rank that left it cannot be brought
        back in step with them."""
        self._check_workers()
        self._in_step = True
        try:
            dist.broadcast_object_list([meta], src=0)
            return self.runner.execute(meta)
        except Exception as exc:
            self._check_workers()  # a dead worker explains it
            self._dead = f"tensor-parallel rank 0 failed during a step: {type(exc).__name__}: {exc}"
            raise ExecutorDied(self._dead) from exc
        finally:
            self._in_step = False

    def shutdown(self) -> None:
        """Stop the workers (asked, then terminated) and leave the process group; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        # A step still running in another thread is inside a collective: no collective from here
        # (nor destroying the group under it); the workers are terminated instead.
        collective = dist.is_initialized() and not self._in_step
        asked = False
        if collective:
            if self._dead is None and all(p.is_alive() for p in self.workers):
                asked = True
                try:
                    dist.broadcast_object_list([None], src=0)
                except Exception:  # noqa: BLE001 - the workers are stopped below either way
                    pass
        for proc in self.workers:
            proc.join(timeout=10 if asked else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if collective:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        shutil.rmtree(self._dir, ignore_errors=True)
