"""Helpers shared by tests."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys

import pytest


def require_tool(name: str, package: str) -> str:
    """The path of an external tool the test needs: missing, the test fails under CI (which
    installs it: `make install`) and is skipped elsewhere, saying how to install it."""
    exe = shutil.which(name)
    if exe is None:
        message = f"{name} is missing: `make install` installs it as root (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A failed command that printed exactly one `error:` line naming the problem, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


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


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_model_dir(root, tokenizer, max_position_embeddings: int, seed: int):
    """A debug-size model directory with the test tokenizer (and its chat template)."""
    from lmfleet.model import ModelConfig, build_model, save_model

    config = ModelConfig.from_flavor("debug", vocab_size=tokenizer.vocab_size,
                                     max_position_embeddings=max_position_embeddings)
    path = root / "model"
    save_model(build_model(config, seed=seed), path, tokenizer=tokenizer)
    return path


def serve_process(model_dir, *args: str, cwd=None, env=None, timeout: float = 120, command=("serve",)):
    """`lmfleet serve MODEL_DIR --port P ARGS` (the installed entry point; `command` ("recsys", "serve")
    for the recommender), once healthy: the process (stdout and stderr in one pipe) and its URL.
    Fails with the server's output if it exits or stays unhealthy past `timeout` seconds."""
    from pathlib import Path

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("lmfleet")), *command, str(model_dir), "--port",
                             str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout, lambda: proc.stdout.read())
    return proc, url


def wait_healthy(url: str, proc, timeout: float, output) -> None:
    """Until `url`/health answers 200; if `proc` exits or `timeout` seconds pass first, it is
    killed and the assertion carries `output()` (the server's log)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(output())
        time.sleep(0.3)


def stop_process(proc, timeout: float = 60) -> None:
    """SIGTERM a process the test started, if it still runs, and wait; SIGKILL after `timeout` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
