"""The OpenAI-compatible API server: `build_app` (FastAPI) and `run_server` (uvicorn)."""

from lmfleet.serve.app import begin_draining, build_app
from lmfleet.serve.frontend import APIError, ServeSettings

__all__ = ["APIError", "ServeSettings", "begin_draining", "build_app"]
