"""The OpenAI-compatible API server: `build_app` (FastAPI) and `run_server` (uvicorn)."""

from lmfleet.serve.app import APIError, ServeSettings, begin_draining, build_app

__all__ = ["APIError", "ServeSettings", "begin_draining", "build_app"]
