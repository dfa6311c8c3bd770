"""A full disk under the home: submit says so in one sentence and leaves nothing behind; a
worker holds the outcomes it cannot write, stays alive, and publishes them when space returns."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Workers, assert_no_claims, log_of, submit, wait_outcomes, write_config
from fake_openai import FakeOpenAI
from koubou_spool.errors import EXIT_UNUSABLE
from koubou_spool.spool import home as home_module
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import NoSpace, Spool

CONDITION = "no space left for"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test alone, unmounted at its end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a 2 MiB tmpfs for a full disk: bin/koubou-test run as "
                    "root enables it")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs was refused here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _fill(disk: Path) -> Path:
    """Write until the disk refuses: the filler file, to delete when space should return."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    chunk = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                if len(chunk) == 1:
                    return filler
                chunk = chunk[:len(chunk) // 2]
    finally:
        os.close(fd)


def _home_on(disk: Path, base_url: str) -> Spool:
    home = disk / "home"
    home_module.init(home)
    write_config(home, base_url, spool={"fsync": True, "heartbeat_s": 1, "lease_s": 10,
                                        "grace_s": 0.5, "stop_grace_s": 10})
    return Spool.open(home)


def _submit_cli(home: Path, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "koubou_spool.cli.submit", "--home", str(home),
                           text], capture_output=True, text=True, timeout=60)


def _wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.05)


def test_submit_on_a_full_disk_exits_4_and_leaves_nothing(small_disk: Path) -> None:
    spool = _home_on(small_disk, "http://127.0.0.1:9/v1")
    _fill(small_disk)
    done = _submit_cli(spool.home, "hello " * 2000)
    assert done.returncode == EXIT_UNUSABLE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and CONDITION in lines[0] and "Traceback" not in done.stderr
    assert os.listdir(spool.pending) == [] and os.listdir(spool.tmp) == []


def test_submit_to_a_read_only_home_exits_4(small_disk: Path) -> None:
    spool = _home_on(small_disk, "http://127.0.0.1:9/v1")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=30)
    done = _submit_cli(spool.home, "hello")
    assert done.returncode == EXIT_UNUSABLE, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "read-only" in lines[0] and "Traceback" not in done.stderr
    assert os.listdir(spool.pending) == [] and os.listdir(spool.tmp) == []


def test_publish_on_a_full_disk_keeps_the_claim_and_leaves_no_staging_file(
        small_disk: Path) -> None:
    spool = _home_on(small_disk, "http://127.0.0.1:9/v1")
    task = task_format.validate({"id": "t1", "content": "x"})
    spool.submit([task])
    claim = spool.claim("t1.json", "w-1-aaaa")
    filler = _fill(small_disk)
    record = task_format.completed_record(task, {"content": "y" * 100_000})
    with pytest.raises(NoSpace):
        spool.publish(claim, "t1", record)
    assert os.listdir(spool.in_progress) == [claim.file_name]  # unfenced: still ours
    assert os.listdir(spool.tmp) == [] and os.listdir(spool.completed) == []
    filler.unlink()
    assert spool.publish(claim, "t1", record)
    assert spool.outcome("t1")["status"] == "completed"


def test_a_worker_holds_outcomes_on_a_full_disk_and_publishes_them_when_space_returns(
        small_disk: Path, workers: Workers) -> None:
    fake = FakeOpenAI(latency_s=2.0).start()
    try:
        spool = _home_on(small_disk, fake.base_url)
        ids = [submit(spool, id=f"t{i}", content=f"task {i}") for i in range(6)]
        worker = workers.start(spool.home)
        _wait_for(lambda: fake.in_flight > 0, 20, "the first request arrives")
        filler = _fill(small_disk)  # under the ledger too: it keeps its records meanwhile
        _wait_for(lambda: CONDITION in log_of(worker), 20, "the worker meets the full disk")
        time.sleep(3)  # more outcomes meet it too: the condition is still said once
        assert worker.poll() is None, log_of(worker)
        assert not any(n.endswith(".json") for n in os.listdir(spool.completed))
        assert os.listdir(spool.tmp) == []
        filler.unlink()
        outcomes = wait_outcomes(spool, ids, timeout=60)
        assert all(o["status"] == "completed" for o in outcomes.values()), outcomes
        assert len(fake.completions()) == len(ids)  # each ran once
        assert worker.poll() is None
        assert log_of(worker).count(CONDITION) <= 2, log_of(worker)
        assert_no_claims(spool)
        assert os.listdir(spool.tmp) == []
        workers.terminate_all()
        assert worker.returncode == 0, log_of(worker)
        with sqlite3.connect(spool.home / "db" / "koubou.db") as db:  # the ledger kept them
            rows = db.execute("SELECT task_id, count(*) FROM attempts WHERE outcome = 'completed'"
                              " GROUP BY task_id").fetchall()
        assert sorted(rows) == [(i, 1) for i in ids]
    finally:
        fake.stop()


def test_a_worker_stopped_while_the_disk_is_full_requeues_what_it_held(
        small_disk: Path, workers: Workers) -> None:
    fake = FakeOpenAI(latency_s=1.0).start()
    try:
        spool = _home_on(small_disk, fake.base_url)
        ids = [submit(spool, id=f"t{i}", content=f"task {i}") for i in range(3)]
        worker = workers.start(spool.home)
        _wait_for(lambda: fake.in_flight > 0, 20, "the first request arrives")
        _fill(small_disk)
        _wait_for(lambda: CONDITION in log_of(worker), 20, "the worker meets the full disk")
        workers.terminate_all()
        assert worker.returncode == 0, log_of(worker)
        assert sorted(os.listdir(spool.pending)) == sorted(f"{i}.json" for i in ids)
        assert os.listdir(spool.in_progress) == [] and os.listdir(spool.tmp) == []
    finally:
        fake.stop()
