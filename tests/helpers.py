"""Helpers shared by tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the installed `lmfleet` entry point as a user would."""
    return subprocess.run([sys.executable, "-m", "lmfleet.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
