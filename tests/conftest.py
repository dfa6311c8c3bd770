"""Shared fixtures: a temporary home, the loopback fake OpenAI server, real worker processes,
the real llama.cpp engine, a real PostgreSQL server, and the rule for tests whose outside piece
is missing."""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn
from collections.abc import Iterator

import pytest
import yaml

from koubou_spool.spool import home as home_module
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool
from koubou_spool.spool.watcher import wait_for_files

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402
import realengine  # noqa: E402
import pgserver  # noqa: E402


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI services set it), where nothing may be skipped."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(need: str, command: str) -> NoReturn:
    """Skip a test whose outside piece is absent, naming the command that enables it; in CI,
    fail it: CI sets everything up, so a missing piece there is a broken set-up."""
    __tracebackhide__ = True  # the skip line names the test, not this function
    message = f"needs {need}: `{command}` enables it, or bin/koubou-test run as root"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own KOUBOU_HOME, and no variable that could send traffic elsewhere."""
    home = tmp_path / "home"
    monkeypatch.setenv("KOUBOU_HOME", str(home))
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest tests (marked `slow`) first: with four test processes, one of them started
    last would keep the run going alone for its whole length."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def real_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base_url of a real llama.cpp server (tests/realengine.py), one for the session."""
    if not realengine.is_built():
        missing("the real llama.cpp engine (a 4-minute build)", realengine.BUILD_ENABLES)
    with realengine.serving(tmp_path_factory.mktemp("engine")) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgserver.PgServer]:
    """A real PostgreSQL server (tests/pgserver.py) of this session: under pytest-xdist each
    worker process has a session, hence a server of its own, on its own port and directory."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg 3", "pip install -e '.[cluster]'")
    if not pgserver.is_available():
        missing("PostgreSQL's initdb and postgres", pgserver.ENABLES)
    server = pgserver.PgServer().init().start()
    yield server
    server.destroy()


@pytest.fixture
def pg_dsn(pg_server: pgserver.PgServer) -> Iterator[str]:
    """The DSN of a fresh, empty database for one test, dropped after it."""
    name = f"t_{os.urandom(6).hex()}"
    dsn = pg_server.create_database(name)
    yield dsn
    if pg_server.proc is None:
        pg_server.start()  # a test that stopped the server leaves it for the next one
    pg_server.drop_database(name)


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """The loopback OpenAI-compatible server."""
    fake = FakeOpenAI().start()
    yield fake
    fake.stop()


def write_config(home: Path, base_url: str = "http://127.0.0.1:9/v1", **overrides: Any) -> Path:
    """A config with an openai craftsman `local` at base_url and the `echo` craftsman."""
    config = {
        "craftsmen": {
            "local": {"backend": "openai", "base_url": base_url, "model": "fake-model",
                      "local": True, "max_concurrent": 4, "timeout_s": 10, "max_tokens": 64,
                      "retries": 0},
            "echo": {"backend": "echo", "max_concurrent": 16},
        },
        "routing": {"rules": [{"then": "local"}]},
        "spool": {"fsync": True, "heartbeat_s": 1, "lease_s": 10, "grace_s": 0.5,
                  "stop_grace_s": 10},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = home / "config" / "koubou.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def home(isolated_env: Path, fake_openai: FakeOpenAI) -> Path:
    """An initialised home whose `local` craftsman is the fake server."""
    home_module.init(isolated_env)
    write_config(isolated_env, fake_openai.base_url)
    return isolated_env


@pytest.fixture
def spool(home: Path) -> Spool:
    return Spool.open(home)


class Forked:
    """A worker the zygote forked (tests/zygote.py), with what the tests use of a Popen."""

    def __init__(self, pid: int, log_path: str) -> None:
        self.pid, self.log_path = pid, log_path
        self.returncode: int | None = None
        self.ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self.ended.wait(timeout):
            raise subprocess.TimeoutExpired(["koubou", "worker"], timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # never a pid the zygote reaped (it may be reused)
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


class Zygote:
    """This test process's zygote (tests/zygote.py): one interpreter that has imported koubou
    and openai, forking the tests' workers. Its children's ends come back on its stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "zygote.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lock = threading.Lock()  # one request, one answer
        self.spawned: queue.Queue[Forked] = queue.Queue()
        self.live: dict[int, Forked] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def start(self, argv: list[str], log_path: str, env: dict[str, str] | None = None) -> Forked:
        """`koubou ARGV`, forked, its output to log_path, in `env` (else this one's)."""
        request = {"argv": argv, "env": dict(os.environ if env is None else env),
                   "cwd": os.getcwd(), "log": log_path}
        with self.lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
            return self.spawned.get(timeout=30)  # the handle, even of a child gone already

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            said = json.loads(line)
            if "spawned" in said:
                self.live[said["spawned"]] = child = Forked(said["spawned"], "")
                self.spawned.put(child)
            else:
                child = self.live.pop(said["exited"])
                child.returncode = said["returncode"]
                child.ended.set()


_zygote: Zygote | None = None


def forking() -> bool:
    """Whether the tests' koubou processes are forked by the zygote (KOUBOU_TEST_ZYGOTE=0: no)."""
    return os.environ.get("KOUBOU_TEST_ZYGOTE", "1") != "0"


def zygote() -> Zygote:
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote()
    return _zygote


class Workers:
    """Worker processes started by a test, all reaped at its end: forked by the zygote, or, with
    KOUBOU_TEST_ZYGOTE=0, each its own `python -m koubou_spool.cli.koubou worker`."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Any] = []

    def start(self, home: Path, *args: str) -> Any:
        argv = ["worker", "--home", str(home), "--log-level", "info", *args]
        log_path = str(self.tmp_path / f"worker-{len(self.procs)}.log")
        if forking():
            proc = zygote().start(argv, log_path)
            proc.log_path = log_path
        else:
            with open(log_path, "wb") as log:
                proc = subprocess.Popen([sys.executable, "-m", "koubou_spool.cli.koubou", *argv],
                                        stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT)
            proc.log_path = log_path  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def terminate_all(self) -> None:
        """SIGTERM every worker and wait: they finish what they hold and exit 0."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    yield pool
    pool.stop_all()


def log_of(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]


def wait_log(proc: subprocess.Popen, text: str, timeout: float = 10) -> str:
    """The worker's log once it holds `text`: a line logged after the event the test saw (an
    aborted request, say) can lag it by a moment on a loaded machine."""
    deadline = time.monotonic() + timeout
    while text not in (log := log_of(proc)):
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout} s:\n{log}"
        time.sleep(0.05)
    return log


def submit(spool: Spool, **fields: Any) -> str:
    """Queue one task through the spool API and return its id."""
    fields.setdefault("content", "hello")
    task = task_format.validate(fields)
    spool.submit([task])
    return task.id


def wait_outcomes(spool: Spool, ids: list[str], timeout: float = 30) -> dict[str, dict]:
    """Outcome records of the tasks, waiting with inotify; fails the test on timeout."""
    names = {f"{i}.json" for i in ids}
    found = wait_for_files([spool.completed, spool.failed], names, timeout)
    assert found == names, f"{len(names - found)} tasks not finished in {timeout} s"
    return {i: spool.outcome(i) for i in ids}


def finished_attempt(home: Path, task_id: str, columns: str, timeout: float = 10) -> tuple:
    """The ledger row (`columns`) of the task's last finished attempt. A worker records an
    attempt's end once its outcome is durable, so the row follows the outcome file by a few
    milliseconds: read again until it is there (no event says when the writer thread commits)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(home / "db" / "koubou.db", timeout=10)
        try:
            row = conn.execute(f"SELECT {columns} FROM attempts WHERE task_id = ? AND outcome IS "
                               "NOT NULL ORDER BY attempt DESC", (task_id,)).fetchone()
        finally:
            conn.close()
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no finished attempt of {task_id} in the ledger"
        time.sleep(0.01)


def assert_no_claims(spool: Spool, timeout: float = 5) -> None:
    """in_progress/ empties: a worker removes a published outcome's finishing claim once the
    ledger has its record, a moment after the outcome appears."""
    deadline = time.monotonic() + timeout
    while os.listdir(spool.in_progress):
        assert time.monotonic() < deadline, f"claims left: {os.listdir(spool.in_progress)}"
        time.sleep(0.05)


def wait_ready(spool: Spool) -> None:
    """Until a worker is watching: an echo probe task has gone through."""
    probe = submit(spool, craftsman="echo", content="probe", id=f"probe-{task_format.new_id()}")
    wait_outcomes(spool, [probe])


def wait_worker_row(home: Path, timeout: float = 10) -> None:
    """Until the ledger has a worker's row: it is written behind the outcomes, by the worker's
    ledger thread (read-only here, so the test never creates the file the worker is about to)."""
    from koubou_spool.spool import ledger
    deadline = time.monotonic() + timeout
    while not ledger.read(home / "db" / "koubou.db", ledger.workers, default=[]):
        assert time.monotonic() < deadline, f"no worker row in the ledger within {timeout} s"
        time.sleep(0.1)


def wait_file(directory: Path, name: str, timeout: float = 10) -> None:
    assert wait_for_files([directory], {name}, timeout) == {name}, f"{name} not in {directory}"


def read_json(path: Path) -> Any:
    return json.loads(path.read_bytes())
