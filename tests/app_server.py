"""`python app.py` as a child process on a free port, for the tests that drive the running app."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_app(args: list[str], env: dict[str, str], log_path: Path, port: int,
                what: str = "the app") -> Iterator[tuple[str, subprocess.Popen]]:
    """(url, process) once the app answers; stopped on exit. Its output goes to log_path."""
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=dict(os.environ, **env),
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"{what} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
    try:
        yield url, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
