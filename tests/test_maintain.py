"""`koubou maintain`: recovery of dead workers' tasks, expiry, retention, tmp cleanup, the lock."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from filelock import FileLock

from conftest import Workers, read_json, submit, wait_outcomes
from fake_openai import FakeOpenAI
from koubou_spool.spool import ledger
from koubou_spool.spool import task as task_format
from koubou_spool.cli.koubou import cli
from koubou_spool.errors import UsageError
from koubou_spool.ops.maintain import parse_duration
from koubou_spool.spool.files import Spool

DAY = 86400


def maintain_processes(home: Path, count: int, *args: str) -> list[tuple[int, dict, str]]:
    """Start `count` maintain processes at once; (exit code, JSON summary, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-m", "koubou_spool.cli.koubou", "maintain",
                               "--home", str(home), "--json", *args],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(count)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            results.append((proc.returncode, json.loads(out) if out.strip() else {}, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return results


def orphan_claims(spool: Spool, count: int) -> list[str]:
    """Claims in in_progress/ of a worker that is gone (no lock file): what kill -9 leaves."""
    ids = []
    for n in range(count):
        task = task_format.validate({"content": f"orphan {n}", "id": f"orphan-{n}"})
        (spool.in_progress / f"{task.id}.json@deadhost-1-dead").write_bytes(
            task_format.encode(task.raw))
        ids.append(task.id)
    return ids


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(cli, ["maintain", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_durations_parse_and_bad_ones_say_how() -> None:
    assert parse_duration("30m") == 1800 and parse_duration("12h") == 43200
    assert parse_duration("7d") == 7 * DAY and parse_duration("2w") == 14 * DAY
    with pytest.raises(UsageError, match="such as 30m, 12h or 7d"):
        parse_duration("7 days")


def test_maintain_requeues_a_killed_workers_task_with_its_attempt_counted(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.latency_s = 5
    victim = workers.start(home)
    task_id = submit(spool, content="survive")
    assert fake_openai.request_seen.wait(10)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    [(code, summary, err)] = maintain_processes(home, 1)
    assert code == 0, err
    assert summary["requeued"] == 1 and summary["lost"] == 0
    assert read_json(spool.pending / f"{task_id}.json")["attempts"] == 1
    assert os.listdir(spool.in_progress) == []
    conn = sqlite3.connect(home / "db" / "koubou.db")
    assert conn.execute("SELECT outcome FROM attempts WHERE task_id = ?",
                        (task_id,)).fetchone() == ("lost",)
    assert not [n for n in os.listdir(spool.workers) if n.startswith("maintain-")]


def test_concurrent_runs_one_works_all_exit_zero(home: Path, spool: Spool) -> None:
    ids = orphan_claims(spool, 30)
    results = maintain_processes(home, 5)
    assert [code for code, _, _ in results] == [0] * 5, [err for _, _, err in results]
    assert sum(summary["requeued"] for _, summary, _ in results) == len(ids)
    workers_that_worked = [s for _, s, _ in results if s["requeued"]]
    assert len(workers_that_worked) == 1  # the rest skipped, or ran after it and found nothing
    for _, summary, err in results:
        if summary["skipped"]:
            assert "another maintain is running" in err
    assert sorted(os.listdir(spool.pending)) == sorted(f"{i}.json" for i in ids)
    assert all(read_json(spool.pending / f"{i}.json")["attempts"] == 1 for i in ids)
    assert os.listdir(spool.in_progress) == []


def test_a_run_while_another_holds_the_lock_exits_zero_and_does_nothing(
        home: Path, spool: Spool) -> None:
    ids = orphan_claims(spool, 2)
    with FileLock(str(home / "run" / "maintain.lock")):
        results = maintain_processes(home, 3)
    for code, summary, err in results:
        assert code == 0 and summary["skipped"] is True
        assert "another maintain is running" in err
    assert len(os.listdir(spool.in_progress)) == len(ids)


def test_expired_pending_tasks_fail_as_expired(home: Path, spool: Spool) -> None:
    past = task_format.iso(time.time() - 60)
    future = task_format.iso(time.time() + 3600)
    stale = submit(spool, content="too late", expires_at=past)
    fresh = submit(spool, content="in time", expires_at=future)
    plain = submit(spool, content="no deadline")
    assert invoke()["expired"] == 1
    error = read_json(spool.failed / f"{stale}.json")["error"]
    assert error["kind"] == "expired" and past in error["message"]
    assert sorted(os.listdir(spool.pending)) == sorted([f"{fresh}.json", f"{plain}.json"])
    assert os.listdir(spool.in_progress) == []
    conn = sqlite3.connect(home / "db" / "koubou.db")
    assert conn.execute("SELECT status, error_kind FROM tasks WHERE id = ?",
                        (stale,)).fetchone() == ("failed", "expired")


def _outcome(spool: Spool, task_id: str, old: bool) -> None:
    record = task_format.completed_record(
        task_format.validate({"content": "x", "id": task_id}),
        {"content": "done", "craftsman": "echo", "model": "echo", "attempts": 1,
         "finished_at": task_format.iso(time.time())})
    path = spool.completed / f"{task_id}.json"
    path.write_bytes(task_format.encode(record))
    conn = ledger.open_ledger(spool.home / "db" / "koubou.db")
    ledger.rebuild_insert(conn, [ledger.task_row(record)],
                          [{"task_id": task_id, "attempt": 1, "outcome": "completed"}], [])
    conn.close()
    if old:
        age(path, 8 * DAY)


def test_old_outcomes_and_their_ledger_rows_are_purged(home: Path, spool: Spool) -> None:
    _outcome(spool, "old-one", old=True)
    _outcome(spool, "new-one", old=False)
    (spool.failed / "junk.json").write_bytes(b"not json")
    (spool.failed / "junk.json.error.json").write_text("{}")
    age(spool.failed / "junk.json.error.json", 8 * DAY)
    # rejected long after the user wrote it: rename kept the old mtime, the sidecar is new
    (spool.failed / "kept.json").write_bytes(b"[]")
    (spool.failed / "kept.json.error.json").write_text("{}")
    age(spool.failed / "kept.json", 30 * DAY)
    (spool.failed / "rejected-dir").mkdir()
    (spool.failed / "rejected-dir" / "inside").write_text("x")
    (spool.failed / "rejected-dir.error.json").write_text("{}")
    age(spool.failed / "rejected-dir.error.json", 8 * DAY)
    summary = invoke("--purge-after", "7d", "--purge-ledger")
    assert summary["purged"] == 3 and summary["purged_ledger_rows"] == 2
    assert os.listdir(spool.completed) == ["new-one.json"]
    assert sorted(os.listdir(spool.failed)) == ["kept.json", "kept.json.error.json"]
    conn = sqlite3.connect(home / "db" / "koubou.db")
    assert [r[0] for r in conn.execute("SELECT id FROM tasks")] == ["new-one"]
    assert [r[0] for r in conn.execute("SELECT task_id FROM attempts")] == ["new-one"]


def test_without_purge_after_nothing_is_purged(home: Path, spool: Spool) -> None:
    _outcome(spool, "ancient", old=True)
    assert invoke("--vacuum")["purged"] == 0
    assert os.listdir(spool.completed) == ["ancient.json"]


def test_stale_tmp_files_are_removed_fresh_ones_kept(home: Path, spool: Spool) -> None:
    (spool.tmp / ".dead-writer").write_text("half")
    age(spool.tmp / ".dead-writer", 2 * DAY)
    (spool.tmp / ".live-writer").write_text("writing")
    ledger.open_ledger(home / "db" / "koubou.db").close()
    summary = invoke("--vacuum")
    assert summary["tmp_removed"] == 1 and summary["vacuumed"] is True
    assert os.listdir(spool.tmp) == [".live-writer"]


def test_lock_files_of_workers_dead_for_a_day_are_removed(
        home: Path, spool: Spool, workers: Workers) -> None:
    live = workers.start(home)
    wait_outcomes(spool, [submit(spool, craftsman="echo")])  # the live worker has registered
    for worker_id, days in (("w-dead-long", 2), ("w-dead-recently", 0)):
        os.close(spool.register_worker(worker_id, {"pid": 0}))  # closing the fd = dying
        age(spool.workers / f"{worker_id}.lock", days * DAY)
    (live_lock,) = set(os.listdir(spool.workers)) - {"w-dead-long.lock", "w-dead-recently.lock"}
    age(spool.workers / live_lock, 2 * DAY)  # a live worker that missed heartbeats is not dead
    summary = invoke()
    assert summary["workers_removed"] == 1
    assert sorted(os.listdir(spool.workers)) == sorted([live_lock, "w-dead-recently.lock"])
    assert live.poll() is None


def test_the_summary_is_one_line(home: Path) -> None:
    result = CliRunner().invoke(cli, ["maintain"])
    assert result.exit_code == 0
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("maintain: requeued 0")


def test_a_bad_duration_is_a_usage_error(home: Path) -> None:
    result = CliRunner().invoke(cli, ["maintain", "--purge-after", "soon"])
    assert result.exit_code == 2 and "30m, 12h or 7d" in result.stderr


def test_a_purged_outcome_takes_its_outputs_directory_with_it(home: Path, spool: Spool,
                                                              tmp_path: Path) -> None:
    outside = tmp_path / "not-ours"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    for task_id in ("old-one", "new-one", "still-queued"):
        work = home / "outputs" / task_id
        (work / "src").mkdir(parents=True)
        (work / "src" / "main.py").write_text("print()")
        (work / "link").symlink_to(outside)  # an agent's link is removed, never followed
        age(work, 8 * DAY)
    _outcome(spool, "old-one", old=True)
    _outcome(spool, "new-one", old=False)
    submit(spool, id="still-queued")
    summary = invoke("--purge-after", "7d")
    assert summary["purged"] == 1 and summary["outputs_purged"] == 1
    assert sorted(os.listdir(home / "outputs")) == ["new-one", "still-queued"]
    assert (outside / "keep.txt").exists()


def _bulky_ledger(path: Path) -> None:
    """About 100 MB of ledger, half of it freed: a VACUUM with real work to do."""
    conn = ledger.open_ledger(path)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO rejects VALUES (?, ?, ?)",
                     ((f"file-{n}", "x" * 1000, 0.0) for n in range(100_000)))
    conn.execute("COMMIT")
    conn.execute("DELETE FROM rejects WHERE rowid % 2 = 0")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_vacuum_never_holds_the_ledger_past_its_bound_while_workers_run(
        home: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou_spool.config import Config
    from koubou_spool.ops import maintain as maintain_module
    path = home / "db" / "koubou.db"
    _bulky_ledger(path)
    monkeypatch.setattr(maintain_module, "VACUUM_MAX_S", 0.05, raising=False)
    worker_lock = spool.register_worker("worker-alive", {})  # a worker is running
    waits: list[float] = []
    stop = threading.Event()

    def write() -> None:  # a worker's ledger writes, timed
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        while not stop.is_set():
            started = time.monotonic()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
            waits.append(time.monotonic() - started)
            stop.wait(0.005)
        conn.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        summary = maintain_module.run(spool, Config(craftsmen={}), path, vacuum=True)
    finally:
        stop.set()
        writer.join(30)
        spool.unregister_worker("worker-alive", worker_lock)
    assert max(waits) < 0.4, f"a write waited {max(waits):.2f} s behind the vacuum"
    assert not summary.vacuumed and "vacuum skipped" in " ".join(summary.errors)
    conn = ledger.open_ledger(path)  # rolled back whole: the ledger is as it was
    assert conn.execute("SELECT COUNT(*) FROM rejects").fetchone()[0] == 50_000
    summary = maintain_module.run(spool, Config(craftsmen={}), path, vacuum=True)
    assert summary.vacuumed  # no worker running: the vacuum may take its time


def test_vacuum_of_a_locked_ledger_is_skipped_and_maintain_exits_zero(home: Path) -> None:
    holder = sqlite3.connect(home / "db" / "koubou.db", timeout=0, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        summary = invoke("--home", str(home), "--vacuum")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert summary["vacuumed"] is False and summary["errors"]
