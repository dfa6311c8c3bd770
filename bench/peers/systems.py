"""The systems compared: each one builds its state in a directory, runs its own consumer
processes, takes submissions from the bench, and leaves a trace the bench can watch.

Every system has the same small surface: `arrivals()` (what the bench watches), `start()`,
`submit_backlog(ids)`, `prepare(id)` + `submit(prepared)` (so a single submission is timed from
the moment the task becomes visible), `executions()` (how many times each task ran), `stop()`.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from . import observe

PEERS = Path(__file__).resolve().parent
ROOT = PEERS.parent.parent
sys.path.insert(0, str(ROOT))

from koubou_spool.spool import home as home_module  # noqa: E402
from koubou_spool.spool import task as task_format  # noqa: E402
from koubou_spool.spool.files import Spool  # noqa: E402


class System:
    """Consumer processes over a state directory; subclasses say what they run and watch.

    `consumers` is how many consumer processes (or Huey workers) a system runs."""

    name = "system"
    consumers = 1

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True)
        self.procs: list[subprocess.Popen] = []
        self.log = self.dir / "executions.log"

    def arrivals(self) -> observe.DirArrivals | observe.LogArrivals:
        """What the bench watches for finished tasks (by default, the execution log)."""
        return observe.LogArrivals(self.log)

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Start one consumer process; its log (each system's default level) goes to a file."""
        with (self.dir / "consumer.log").open("ab") as log:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=log, env={**os.environ, **(env or {})},
                                               cwd=self.dir))

    def diagnosis(self) -> str:
        """Exit codes of consumers that died, and the end of their log: for error messages."""
        died = [f"pid {p.pid} exited {p.returncode}" for p in self.procs if p.poll() is not None]
        try:
            tail = (self.dir / "consumer.log").read_text(errors="replace")[-1500:]
        except OSError:
            tail = ""
        return f"{self.name}: {', '.join(died) or 'consumers alive'}; log ends:\n{tail}"

    def roots(self) -> list[int]:
        """Pids of the consumer processes this system started."""
        return [p.pid for p in self.procs]

    def pids(self) -> list[int]:
        """The consumer processes and their children."""
        return observe.process_tree(self.roots())

    def executions(self) -> Counter[str]:
        """How many times each task ran, from the append-only execution log."""
        return Counter(self.log.read_text().split())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for anything (children included) still there after 10 s."""
        tree = self.pids()
        observe.signal_all(tree, signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        observe.signal_all([pid for pid in tree if Path(f"/proc/{pid}").exists()],
                           signal.SIGKILL)
        self.procs.clear()


def _task(task_id: str, **fields: Any) -> task_format.Task:
    return task_format.validate({"content": f"no-op {task_id}", "id": task_id, **fields})


class FileSpool(System):
    """Shared by koubou and the bare loop: tasks are koubou's own files, submitted koubou's way."""

    fsync = True

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        home_module.init(self.dir / "home")
        self.spool = Spool(self.dir / "home", fsync=self.fsync)

    def submit_backlog(self, ids: list[str], **fields: Any) -> None:
        """koubou-submit's path: tmp, fsync (when on), rename, one fsync of pending/."""
        self.spool.submit([_task(i, **fields) for i in ids])

    def prepare(self, task_id: str) -> tuple[Path, Path]:
        """Write the task to tmp/ (fsynced when on): the submission is then one rename."""
        task = _task(task_id)
        tmp = self.spool._write_tmp(task.id, task_format.encode(task.raw))
        return tmp, self.spool.pending / f"{task.id}.json"

    def submit(self, prepared: tuple[Path, Path]) -> None:
        """The rename into pending/: the moment the task becomes visible."""
        os.rename(*prepared)


class Koubou(FileSpool):
    """koubou-spool: `koubou worker` processes with the built-in echo craftsman, or with an
    openai craftsman at `base_url`. `source`: run the worker from that source tree instead
    (the code before a change, measured in the same run)."""

    def __init__(self, directory: Path, fsync: bool, python: str, consumers: int = 1,
                 source: Path | None = None, label: str = "",
                 base_url: str | None = None) -> None:
        self.fsync = fsync
        self.name = f"koubou{label} fsync {'on' if fsync else 'off'}"
        self.python = python
        self.consumers = consumers
        self.source = source
        super().__init__(directory)
        craftsmen: dict[str, Any] = {"echo": {"backend": "echo", "max_concurrent": 16},
                                     "parked": {"backend": "echo"}}
        first = "echo"
        if base_url:
            craftsmen["local"] = {"backend": "openai", "base_url": base_url, "local": True,
                                  "model": "fake-model", "max_concurrent": 16, "retries": 0}
            first = "local"
        config = {"craftsmen": craftsmen, "routing": {"rules": [{"then": first}]},
                  "spool": {"fsync": fsync, "heartbeat_s": 10}}
        (self.dir / "home" / "config" / "koubou.yaml").write_text(yaml.safe_dump(config))

    def arrivals(self) -> observe.DirArrivals:
        """Outcome files in completed/, and claims in in_progress/."""
        return observe.DirArrivals(self.spool.completed, claims=self.spool.in_progress)

    def start(self, *args: str) -> None:
        """The workers, serving echo (and, unless told otherwise, the parked craftsman)."""
        env = {"PYTHONPATH": str(self.source)} if self.source else {"PYTHONPATH": str(ROOT)}
        for _ in range(self.consumers):
            self.spawn([self.python, "-m", "koubou_spool.cli.koubou", "worker",
                        "--home", str(self.spool.home), *args], env=env)

    def executions(self) -> Counter[str]:
        """Completed attempts per task, from the ledger (read after the worker stopped)."""
        conn = sqlite3.connect(self.spool.home / "db" / "koubou.db")
        try:
            rows = conn.execute("SELECT task_id, COUNT(*) FROM attempts "
                                "WHERE outcome = 'completed' GROUP BY task_id").fetchall()
        finally:
            conn.close()
        return Counter(dict(rows))


class Bare(FileSpool):
    """The floor: bare_loop.py moving koubou's files pending/ -> done/, fsync of file and dir
    on every step (or, with fsync False, the renames alone)."""

    def __init__(self, directory: Path, python: str, fsync: bool = True,
                 consumers: int = 1) -> None:
        self.fsync = fsync
        self.name = f"bare rename+inotify, {'fsync every step' if fsync else 'no fsync'}"
        self.consumers = consumers
        super().__init__(directory)
        self.python = python
        self.done = self.dir / "done"
        self.done.mkdir()

    def arrivals(self) -> observe.DirArrivals:
        """Files arriving in done/."""
        return observe.DirArrivals(self.done)

    def start(self) -> None:
        """The loops, one process each."""
        flag = [] if self.fsync else ["--no-fsync"]
        for _ in range(self.consumers):
            self.spawn([self.python, str(PEERS / "bare_loop.py"), str(self.spool.pending),
                        str(self.done), *flag])

    def executions(self) -> Counter[str]:
        """A rename happens once: each file in done/ is one execution."""
        return Counter(n[:-5] for n in os.listdir(self.done) if n.endswith(".json"))


class Huey(System):
    """Huey with SqliteHuey, default consumer settings (one worker), thread or process."""

    def __init__(self, directory: Path, kind: str, bin_dir: Path, consumers: int = 1) -> None:
        super().__init__(directory)
        self.kind, self.bin_dir, self.consumers = kind, bin_dir, consumers
        self.name = f"huey sqlite {kind}"
        self.db = self.dir / "huey.db"
        sys.path.insert(0, str(PEERS))
        import huey_app  # only inside the bench's virtualenv
        self.app, self.noop = huey_app.build(str(self.db), str(self.log))

    def start(self) -> None:
        """huey_consumer huey_app.huey -k thread|process -w CONSUMERS."""
        self.spawn([str(self.bin_dir / "huey_consumer"), "huey_app.huey", "-k", self.kind,
                    "-w", str(self.consumers)],
                   env={"PYTHONPATH": str(PEERS), "HUEY_DB": str(self.db),
                        "HUEY_LOG": str(self.log)})

    def submit_backlog(self, ids: list[str]) -> None:
        """One enqueue per task, as an application would."""
        for task_id in ids:
            self.noop(task_id)

    def prepare(self, task_id: str) -> str:
        """Nothing to stage: an enqueue is one INSERT."""
        return task_id

    def submit(self, prepared: str) -> None:
        """Enqueue the no-op task."""
        self.noop(prepared)


class Dirq(System):
    """python-dirq QueueSimple with a polling consumer loop (dirq_consumer.py)."""

    name = "python-dirq QueueSimple"

    def __init__(self, directory: Path, python: str, consumers: int = 1) -> None:
        super().__init__(directory)
        from dirq.QueueSimple import QueueSimple  # only inside the bench's virtualenv
        self.python = python
        self.consumers = consumers
        self.queue = QueueSimple(str(self.dir / "queue"))

    def start(self) -> None:
        """The consumer loops, one process each."""
        for _ in range(self.consumers):
            self.spawn([self.python, str(PEERS / "dirq_consumer.py"), str(self.dir / "queue"),
                        str(self.log)])

    def submit_backlog(self, ids: list[str]) -> None:
        """One add per task."""
        for task_id in ids:
            self.queue.add(task_id.encode())

    def prepare(self, task_id: str) -> str:
        """Nothing to stage: add() writes a temporary file and renames it."""
        return task_id

    def submit(self, prepared: str) -> None:
        """Add the element."""
        self.queue.add(prepared.encode())


SEED_SCHEMA = """
CREATE TABLE task_master (
    task_id TEXT PRIMARY KEY, task_type TEXT NOT NULL, assigned_worker_type TEXT,
    status TEXT NOT NULL DEFAULT 'pending', priority INTEGER DEFAULT 5, content TEXT NOT NULL,
    created_by TEXT, created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
CREATE INDEX idx_task_status ON task_master(status);
CREATE INDEX idx_task_priority ON task_master(priority DESC);
CREATE TABLE workers (worker_id TEXT PRIMARY KEY, status TEXT, last_heartbeat TIMESTAMP);
"""


class Seed(System):
    """The seed design: task_master in SQLite, two seed_worker.py processes polling every 5 s."""

    name = "seed: sqlite poll 5s"
    workers = 2
    poll_s = 5

    def __init__(self, directory: Path, python: str) -> None:
        super().__init__(directory)
        self.python = python
        self.db = str(self.dir / "koubou.db")
        self.completed = self.dir / "completed"
        self.completed.mkdir()
        conn = sqlite3.connect(self.db)
        conn.executescript(SEED_SCHEMA)
        conn.close()

    def start(self) -> None:
        """Two worker processes, like the seed's one-per-model setup."""
        for n in range(self.workers):
            self.spawn([self.python, str(PEERS / "seed_worker.py"), self.db, str(self.completed),
                        str(self.log), f"worker_local_{n}"])

    def submit_backlog(self, ids: list[str]) -> None:
        """The seed's delegate_task: connect, INSERT, commit, close, per task."""
        for task_id in ids:
            self.submit(task_id)

    def prepare(self, task_id: str) -> str:
        """Nothing to stage."""
        return task_id

    def submit(self, prepared: str) -> None:
        """INSERT one pending row in its own transaction."""
        conn = sqlite3.connect(self.db)
        try:
            conn.execute("INSERT INTO task_master (task_id, task_type, content, priority, status,"
                         " created_by) VALUES (?, 'general', ?, 5, 'pending', 'bench')",
                         (prepared, f"no-op {prepared}"))
            conn.commit()
        finally:
            conn.close()
