"""Helpers for the `koubou serve` tests: the app in-process (httpx ASGITransport, lifespan run by
hand), and the real server as a uvicorn subprocess on a free loopback port, stopped by pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package installs

from koubou_spool.serve import settings as serve_settings
from koubou_spool.serve.app import build_app
from koubou_spool.service.workshop import Workshop


@contextlib.asynccontextmanager
async def serve_client(home: Path, token: str | None = None,
                       **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app of a home, its lifespan (events, batch runner) running."""
    workshop = Workshop(home, home / "config" / "koubou.yaml")
    guard = build_app(workshop, serve_settings.ServeSettings(**settings))
    app = guard.app
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8787",
                                     headers=headers, timeout=60) as client:
            yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`koubou serve` as a subprocess; stop() by its pid, kill() for kill -9."""

    def __init__(self, home: Path, log_path: Path, *args: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "koubou_spool.cli.koubou", "serve", "--home", str(home),
             "--port", str(self.port), *args],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            env=os.environ | (env or {}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20) -> Server:
        """Until /healthz answers (the process is listening)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited {self.proc.returncode}: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)  # connecting to a socket that is not listening yet
        raise AssertionError(f"serve did not start: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=20)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(home: Path, log_path: Path, *args: str, env: dict | None = None) -> Iterator[Server]:
    server = Server(home, log_path, *args, env=env)
    try:
        yield server.wait_ready()
    finally:
        server.kill()
