#!/usr/bin/env python3
"""A real PostgreSQL server for the cluster tests: initdb into a temporary directory, a free
loopback port, started and stopped by its pid.

    python3 tests/pgserver.py      # says whether the binaries are there, and where
    python3 tests/pgserver.py --serve   # runs one until Ctrl-C, printing its DSN

Debian's `postgresql` package puts the binaries in /usr/lib/postgresql/<major>/bin, off PATH.
initdb and postgres refuse to run as root: run as root, the server runs as the `postgres` user
(Popen's user=, no shell), in a directory that user owns. It listens on 127.0.0.1 only, its
socket in its own directory, and trusts local connections: it lives as long as one test session.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENABLES = "sudo apt-get install postgresql"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
SUPERUSER = "koubou"


def bin_dir() -> Path | None:
    """The directory of initdb and postgres (the newest installed major), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _major(initdb: str) -> int:
    """The major version in /usr/lib/postgresql/<major>/bin/initdb."""
    name = Path(initdb).parent.parent.name
    return int(name) if name.isdigit() else 0


def is_available() -> bool:
    """Whether a server can be started here."""
    where = bin_dir()
    return where is not None and (where / "postgres").exists() and (
        os.geteuid() != 0 or _postgres_user() is not None)


def _postgres_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        return None


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster in a temporary directory; `dsn(dbname)` to reach it. A test may
    add addresses of its own (a network namespace's veth pair, tests/netns.py): `listen` on
    them besides 127.0.0.1, and `trust` the clients of these networks."""

    def __init__(self, listen: tuple[str, ...] = (), trust: tuple[str, ...] = (), *,
                 fsync: bool = False) -> None:
        """fsync: the server's own (off for tests; on for a benchmark that stands for a real
        server, whose commits wait for their WAL to reach the disk)."""
        self.listen, self.trust = listen, trust
        where = bin_dir()
        self.fsync = fsync
        if where is None:
            raise RuntimeError(f"no PostgreSQL binaries; `{ENABLES}` installs them")
        self.bin = where
        self.root = Path(tempfile.mkdtemp(prefix="koubou-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log_path = self.root / "server.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._as: dict = {}
        user = _postgres_user() if os.geteuid() == 0 else None
        if user is not None:
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.sockets.mkdir()
        if user is not None:
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)

    # --- life ------------------------------------------------------------------------------

    def init(self) -> PgServer:
        """initdb: trust on loopback only, our own superuser; no fsync (a test's data)."""
        log = self.root / "initdb.log"
        with open(log, "wb") as out:
            code = subprocess.call(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "-A", "trust",
                 "-E", "UTF8", "--locale=C", "--no-sync"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                timeout=120, **self._as)
        if code != 0:
            raise RuntimeError(f"initdb failed ({code}): {log.read_text(errors='replace')[-2000:]}")
        with open(self.data / "pg_hba.conf", "a") as hba:
            hba.writelines(f"host all all {network} trust\n" for network in self.trust)
        return self

    def start(self) -> PgServer:
        """Start postgres (on the port it had, or a free one) and wait until it answers."""
        if not self.port:
            self.port = free_port()
        log = open(self.log_path, "ab")
        # fsync off (unless asked): a killed server keeps what it wrote in the page cache, which is all a test
        # of a server restart needs (the machine does not crash), and the machine is shared.
        listen = ",".join(("127.0.0.1", *self.listen))
        durable = "on" if self.fsync else "off"
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.sockets), "-c", f"listen_addresses={listen}", "-c", f"fsync={durable}",
             "-c", f"full_page_writes={durable}", "-c", "shared_buffers=16MB",
             "-c", "max_connections=60",
             "-c", "max_wal_senders=0", "-c", "wal_level=minimal", "-c", "log_min_messages=warning"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            start_new_session=True, **self._as)
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        # The server gives no event we could wait on short of its log: ask it, briefly apart.
        import psycopg
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postgres not ready in {START_TIMEOUT_S} s: "
                                       f"{self.log_tail()}") from exc
                time.sleep(0.05)

    def stop(self, how: int = signal.SIGINT) -> None:
        """Stop the server by its pid: SIGINT is a fast shutdown, SIGQUIT an immediate one (a
        crash, recovered at the next start), SIGKILL of the postmaster the hardest."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(how)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        if how == signal.SIGKILL:
            # Its backends outlive a killed postmaster and hold the shared memory: end them too.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_backends_gone(proc.pid)

    def _wait_backends_gone(self, pgid: int) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def restart(self, how: int = signal.SIGINT) -> None:
        """Stop, then start on the same port and data."""
        self.stop(how)
        self.start()

    def destroy(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # --- reaching it -------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        """A libpq connection string to a database of this server, over TCP (loopback unless
        `host` is one of `listen`)."""
        return f"host={host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def create_database(self, name: str) -> str:
        """A new empty database; its DSN."""
        import psycopg
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the connections still on it."""
        import psycopg
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run a server until Ctrl-C")
    args = parser.parse_args()
    if not is_available():
        print(f"PostgreSQL binaries missing: `{ENABLES}` installs them")
        return 1
    if not args.serve:
        print(f"PostgreSQL binaries in {bin_dir()}")
        return 0
    server = PgServer().init().start()
    print(server.dsn(), flush=True)
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        server.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
