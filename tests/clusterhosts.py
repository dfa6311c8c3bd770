"""Homes as hosts of one cluster, for the tests that run them end to end
(tests/test_cluster_hosts.py, tests/test_cluster_scale.py): each home with its own
`koubou worker` and `koubou cluster` processes and its own cluster.host, on the real PostgreSQL
of tests/pgserver.py. A test module that uses the `hosts` fixture binds it to a name of its
own (`hosts = clusterhosts.hosts`), where pytest finds it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from koubou_spool.spool import home as home_module
from koubou_spool.spool.files import Spool

from conftest import forking, log_of, submit, write_config, zygote

try:
    import psycopg
except ImportError:  # the pg_server fixture names the command that adds it
    psycopg = None

DSN_ENV = "KOUBOU_TEST_CLUSTER_DSN"
LEASE_S = 3


class Host:
    """One host: a home, its worker and its bridge, as separate processes."""

    def __init__(self, root: Path, name: str, *, latency_ms: int = 0, slots: int = 16,
                 craftsmen: dict | None = None, serve: list[str] | None = None,
                 log_level: str = "info") -> None:
        """Craftsmen `local` (a loopback server that is not there) and `echo`, or those given
        instead of `echo`; `serve`: its cluster.serve."""
        self.name = name
        self.home = root / name
        self.log_level = log_level
        home_module.init(self.home)
        write_config(self.home, craftsmen={
            "local": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                      "local": True, "max_concurrent": 2, "timeout_s": 5, "retries": 0},
            **(craftsmen or {"echo": {"backend": "echo", "max_concurrent": slots,
                                      "latency_ms": latency_ms}})},
            spool={"fsync": True, "heartbeat_s": 0.5, "lease_s": 10, "grace_s": 0.5,
                   "stop_grace_s": 5},
            cluster={"dsn_env": DSN_ENV, "host": name, "lease_s": LEASE_S,
                     **({"serve": serve} if serve else {})})
        self.spool = Spool.open(self.home)
        self.procs: list[subprocess.Popen] = []
        self.prefix: list[str] = []  # a host in a network namespace: ["ip", "netns", "exec", ...]
        self.env: dict[str, str] | None = None  # its processes' environment, if not ours

    def start(self, *args: str) -> Any:
        """`koubou ARGS` on this host: forked by the zygote, unless in a network namespace."""
        argv = [*args, "--home", str(self.home), "--log-level", self.log_level]
        log_path = str(self.home / f"{args[0]}-{len(self.procs)}.log")
        if forking() and not self.prefix:
            proc = zygote().start(argv, log_path, self.env)
        else:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [*self.prefix, sys.executable, "-m", "koubou_spool.cli.koubou", *argv],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def serve(self, *craftsmen: str) -> tuple[subprocess.Popen, subprocess.Popen]:
        """A worker of these craftsmen and the bridge."""
        worker = self.start("worker", *[arg for c in craftsmen for arg in ("--craftsman", c)])
        bridge = self.start("cluster")
        deadline = time.monotonic() + 15
        while len(self.spool.worker_ids()) < 2:  # nothing announces a registration elsewhere
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.02)
        return worker, bridge

    def kill(self) -> None:
        """kill -9 of every process, all signalled before any is waited for: a bridge that
        outlived its worker by a heartbeat would give that worker's leases back first."""
        for proc in reversed(self.procs):  # the bridges, started after their workers, first
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)

    def terminate(self) -> list[int]:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=20) for proc in self.procs]

    def logs(self, command: str = "") -> str:
        """The logs of its processes (of one command: "worker", "cluster")."""
        return "\n".join(log_of(proc) for proc in self.procs
                         if Path(proc.log_path).name.startswith(command))


@pytest.fixture
def hosts(tmp_path: Path, pg_dsn: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(DSN_ENV, pg_dsn)
    made: list[Host] = []

    def make(name: str, **options: Any) -> Host:
        made.append(Host(tmp_path, name, **options))
        return made[-1]
    yield make
    for host in made:
        host.kill()


def drop(host: Host, count: int, prefix: str) -> list[str]:
    """Tasks for the echo craftsman, queued in the host's pending/."""
    return [submit(host.spool, id=f"{prefix}-{n:03d}", content=f"{prefix} {n}", craftsman="echo")
            for n in range(count)]


def rows(pg_dsn: str) -> dict[str, tuple]:
    """(state, attempt, origin, host, delivered) of every cluster task."""
    with psycopg.connect(pg_dsn) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT id, state, attempt, origin, host, delivered_at IS NOT NULL "
            "FROM cluster_tasks")}


def wait_delivered(pg_dsn: str, ids: list[str], timeout: float = 10) -> dict[str, tuple]:
    deadline = time.monotonic() + timeout
    while True:  # the mark follows the file by one statement: nothing announces it here
        found = rows(pg_dsn)
        if all(found.get(i, ("",) * 5)[4] for i in ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)
