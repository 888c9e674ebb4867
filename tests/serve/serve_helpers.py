"""Helpers for the serving tests: a real ``codeformer-serve`` / ``codeformer-demo`` in a subprocess.

A uniquely named module (every test folder has a conftest). Servers run on a free localhost port
with one torch thread; readiness is taken from the server's own log line, not from sleeping.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

SHARED_FACES = Path(__file__).resolve().parents[2] / ".." / "shared" / "faces"


def shared_file(folder: str, name: str) -> Path:
    """One of the shared face photos, or skip the test when this checkout has none."""
    path = (SHARED_FACES / folder / name).resolve()
    if not path.is_file():
        pytest.skip(f"shared face photo not found at {path} (not part of the repository)")
    return path


def tiny_codeformer_config() -> dict:
    """The suite's tiny CodeFormer (``TINY_CF`` of tests/conftest.py) for session-scoped weights.

    A conftest cannot ``from conftest import`` its parent (the name resolves to itself), so the
    root conftest is loaded by path under another name.
    """
    spec = importlib.util.spec_from_file_location("_root_conftest", Path(__file__).parents[1] / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.TINY_CF)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def descendants(pid: int) -> set[int]:
    """Process ids below ``pid`` (children, grandchildren...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class ServerProcess:
    """``python -m <module> <args>`` with its output collected line by line.

    ``ready_line``: the text that says the server accepts requests. ``log``: everything printed.
    Every instance is listed in ``started``, so that :func:`stop_all` can stop the ones a failed or
    skipped test left running.
    """

    started: list[ServerProcess] = []

    def __init__(self, module: str, args: list[str], ready_line: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--port", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._lines: list[str] = []
        self._ready_line = ready_line
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        ServerProcess.started.append(self)

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.append(line)
            if self._ready_line in line:
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting

    @property
    def log(self) -> str:
        return "".join(self._lines)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        if not self._ready.wait(timeout) or self.process.poll() is not None:
            self.stop()
            raise RuntimeError(f"server did not start within {timeout} s; its output:\n{self.log[-4000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in descendants(self.process.pid):
                    os.kill(pid, signal.SIGKILL)
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        return self.process.returncode


def stop_all() -> None:
    """Stop every server the tests started that is still running (``stop`` of a stopped one is a no-op)."""
    for process in ServerProcess.started:
        process.stop()
    ServerProcess.started.clear()
