"""`lmfleet serve`: one process, uvicorn over the API app, with a graceful shutdown.

SIGTERM or SIGINT: new requests get 503 and the listening socket closes, in-flight requests run
to completion for up to `shutdown_timeout` seconds, then the engine stops and the process exits 0.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import uvicorn

from lmfleet.errors import ConfigError
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


def check_inputs(model_dir: str | Path, ssl_keyfile: str | None, ssl_certfile: str | None) -> None:
    """Fail with a clear message before the port opens: a bad model directory, half a TLS pair."""
    from lmfleet.model.checkpoint import read_config

    read_config(model_dir)
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise ConfigError("--ssl-keyfile and --ssl-certfile go together")
    for path in (ssl_keyfile, ssl_certfile):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"TLS file {path}: no such file")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self._app = app

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

    def factory() -> AsyncLLMEngine:
        return AsyncLLMEngine(LLMEngine(model_dir, **engine_kwargs))

    app = build_app(factory, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, access_log=False)
    _DrainingServer(config, app).run()
