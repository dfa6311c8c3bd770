"""The ledger writer while SQLite is locked: what it keeps in memory, and what it writes after."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou_spool.spool import ledger
from koubou_spool.spool import task as task_format
from koubou_spool.spool.ledger import LedgerWriter


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """A migrated ledger that another connection holds with BEGIN EXCLUSIVE."""
    path = tmp_path / "koubou.db"
    ledger.open_ledger(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    yield path, holder
    holder.close()


def _record(task_id: str) -> dict:
    task = task_format.validate({"id": task_id, "content": "x" * 10_000})
    return task_format.completed_record(task, {"content": "y" * 10_000, "attempts": 1})


def _stuck(writer: LedgerWriter) -> None:
    deadline = time.monotonic() + 10
    while not writer.backlog:  # its first write is waiting for the lock
        assert time.monotonic() < deadline, "the writer never found the ledger locked"
        threading.Event().wait(0.05)


def test_a_locked_ledger_keeps_one_heartbeat_per_worker_and_every_attempt(
        locked: tuple[Path, sqlite3.Connection]) -> None:
    path, holder = locked
    writer = LedgerWriter(path)
    writer.worker_started("w1", "host", 1, ["local"], 1.0)
    for beat in range(10_000):  # hours of heartbeats while the ledger stays locked
        writer.heartbeat("w1", "running", 0, beat, 0, float(beat))
    for i in range(100):
        writer.attempt_finished(f"t{i}", 1, "completed", finished_at=2.0, record=_record(f"t{i}"))
    assert writer.queued <= 103  # started, heartbeats (one queued, one being written), attempts
    holder.rollback()
    writer.close(timeout=30)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone()[0] == 100
    assert conn.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 100
    assert conn.execute("SELECT done, heartbeat_at FROM workers").fetchone() == (9999, 9999.0)


def test_past_its_bound_the_queue_drops_records_and_says_how_to_rebuild(
        locked: tuple[Path, sqlite3.Connection], caplog: pytest.LogCaptureFixture) -> None:
    path, holder = locked
    writer = LedgerWriter(path, max_queued=50)
    writer.rejected("first", "bad", 1.0)
    _stuck(writer)
    with caplog.at_level(logging.WARNING, logger="koubou_spool.spool.ledger"):
        futures = [writer.rejected(f"r{i}", "bad", 1.0) for i in range(100)]
        assert writer.queued == 50
        assert sum(f.done() and f.exception() is not None for f in futures) == 50
        holder.rollback()
        writer.close(timeout=30)
    assert "50 records dropped" in caplog.text and "koubou ledger rebuild" in caplog.text
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM rejects").fetchone()[0] == 51
