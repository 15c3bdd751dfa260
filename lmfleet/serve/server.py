"""`lmfleet serve`: one process, uvicorn over the API app, with a graceful shutdown.

SIGTERM or SIGINT: new requests get 503 and the listening socket closes, in-flight requests run
to completion for up to `shutdown_timeout` seconds, then the engine stops and the process exits 0.
If the engine loop dies, every in-flight request gets its error, the server stops and the process
exits 1, so that its supervisor (systemd, Kubernetes, Ray) starts a fresh one.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn

from lmfleet.errors import ConfigError, LmfleetError
from lmfleet.serve.app import begin_draining, build_app
from lmfleet.serve.frontend import ServeSettings

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str, flag: str) -> int:
    """Bytes from '2GiB', '512MiB', '1.5GB' or a plain number."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"{flag} {text!r}: give a size such as 2GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def engine_options(*, max_num_seqs: int, max_num_batched_tokens: int, dtype: str, device: str,
                   max_model_len: int | None, no_prefix_caching: bool, enforce_eager: bool,
                   gpu_memory_utilization: float, linear_method: str, tensor_parallel_size: int,
                   kv_cache_memory: str | None, kv_cache_flag: str = "--kv-cache-memory") -> dict[str, Any]:
    """The engine's keyword arguments from the serve options (`lmfleet serve`, or a Serve config's
    args): one mapping for both."""
    return dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, dtype=dtype, device=device,
                max_model_len=max_model_len, enable_prefix_caching=not no_prefix_caching, enforce_eager=enforce_eager,
                gpu_memory_utilization=gpu_memory_utilization, linear_method=linear_method,
                tensor_parallel_size=tensor_parallel_size,
                kv_cache_memory=parse_size(kv_cache_memory, kv_cache_flag) if kv_cache_memory else None)


def check_inputs(model_dir: str | Path, ssl_keyfile: str | None, ssl_certfile: str | None) -> None:
    """Fail with a clear message before the port opens: a bad model directory, half a TLS pair."""
    from lmfleet.model.checkpoint import read_config

    read_config(model_dir)
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise ConfigError("--ssl-keyfile and --ssl-certfile go together")
    for path in (ssl_keyfile, ssl_certfile):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path}: no such file")


# Test hook, read once at start-up: the engine loop raises after this many steps.
FAULT_AFTER_STEPS_ENV = "LMFLEET_TEST_ENGINE_FAULT_AFTER_STEPS"
# How long in-flight requests get to receive the engine's failure before a dead engine's server exits.
DEATH_GRACE_S = 1.0


class EngineDied(LmfleetError):
    """The engine loop died: the server failed what was in flight and stopped (exit status 1)."""


class ModelLoadFailed(LmfleetError):
    """The model did not load once the port was open: the server stopped (exit status 1)."""


def _inject_fault(engine: Any, after_steps: int) -> None:
    step, count = engine.step, 0

    def failing_step() -> Any:
        nonlocal count
        count += 1
        if count > after_steps:
            raise RuntimeError(f"injected engine fault after {after_steps} steps ({FAULT_AFTER_STEPS_ENV})")
        return step()

    engine.step = failing_step


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self._app = app
        self.engine_error: BaseException | None = None
        self.load_error: BaseException | None = None

    def engine_died(self, exc: BaseException) -> None:
        """From the engine's thread: in-flight requests were failed; stop serving shortly, so the
        process exits non-zero and systemd, Kubernetes or Ray start a fresh one."""
        self.engine_error = exc
        print(f"error: the engine died ({exc!r}); the server stops", file=sys.stderr, flush=True)
        self._stop_soon()

    def load_failed(self, exc: BaseException) -> None:
        """From the loading thread: nothing will ever be served; stop, exit non-zero."""
        self.load_error = exc
        self._stop_soon()

    def _stop_soon(self) -> None:
        begin_draining(self._app)
        threading.Timer(DEATH_GRACE_S, lambda: setattr(self, "should_exit", True)).start()

    def handle_exit(self, sig: int, frame: Any) -> None:
        begin_draining(self._app)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its shutdown (the process then dies by it); a
        # completed graceful shutdown is a normal exit here, status 0.
        self._captured_signals.clear()


def run_server(model_dir: str | Path, settings: ServeSettings, engine_kwargs: dict[str, Any], host: str = "127.0.0.1",
               port: int = 8000, ssl_keyfile: str | None = None, ssl_certfile: str | None = None,
               shutdown_timeout: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT. The model loads on a thread once the port is open (/health
    answers 503 until then)."""
    from lmfleet.engine import AsyncLLMEngine, LLMEngine

    check_inputs(model_dir, ssl_keyfile, ssl_certfile)
    fault = os.environ.get(FAULT_AFTER_STEPS_ENV)
    server: _DrainingServer | None = None

    def factory() -> AsyncLLMEngine:
        engine = LLMEngine(model_dir, **engine_kwargs)
        if fault is not None:
            _inject_fault(engine, int(fault))
        return AsyncLLMEngine(engine, on_death=server.engine_died if server is not None else None)

    def load_failed(exc: BaseException) -> None:
        if server is not None:
            server.load_failed(exc)

    app = build_app(factory, settings, on_load_error=load_failed)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, access_log=False)
    server = _DrainingServer(config, app)
    server.run()
    if server.load_error is not None:
        first = next((line for line in str(server.load_error).splitlines() if line.strip()), repr(server.load_error))
        raise ModelLoadFailed(f"the model in {model_dir} failed to load: {first}")
    if server.engine_error is not None:
        raise EngineDied(f"the engine died: {server.engine_error!r}")
