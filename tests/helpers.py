"""Helpers shared by tests."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the `lmfleet` entry point in this process (as a user would, minus the interpreter start-up):
    exit status, stdout and stderr as a subprocess would report them."""
    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["lmfleet", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            from lmfleet.cli import main

            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["lmfleet", *args], code, out.getvalue(), err.getvalue())
