"""inotify as a wake-up: a replaced directory is watched again, a linked file is seen."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import Workers, submit, wait_outcomes, wait_ready
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool
from koubou_spool.spool.watcher import OVERFLOW, PENDING_MASK, Watcher, settle_delay


def _events(watcher: Watcher) -> list[tuple[Path | None, str]]:
    assert watcher.wait(5), "no event within 5 s"
    return [(directory, name) for directory, name, _ in watcher.events()]


def _replace(directory: Path, how: str) -> None:
    if how == "rmdir":
        directory.rmdir()
        directory.mkdir()
    elif how == "rename away":
        directory.rename(directory.with_name("old"))
        directory.mkdir()
    else:  # a new directory renamed over the old one, as a restore from backup does
        directory.with_name("new").mkdir()
        directory.with_name("new").rename(directory)


@pytest.mark.parametrize("how", ["rmdir", "rename away", "rename over"])
def test_a_replaced_directory_is_rescanned_and_watched_again(tmp_path: Path, how: str) -> None:
    pending = tmp_path / "tasks" / "pending"
    pending.mkdir(parents=True)
    watcher = Watcher()
    try:
        watcher.watch(pending, PENDING_MASK)
        _replace(pending, how)
        seen = _events(watcher)
        assert (None, OVERFLOW) in seen  # a rescan, once the new directory is watched
        (pending / "t1.json").write_text("{}")
        seen = []
        while (pending, "t1.json") not in seen:
            seen += _events(watcher)
        if how == "rename away":
            (tmp_path / "tasks" / "old" / "stale.json").write_text("{}")
            assert not watcher.wait(0.2), "the moved-away directory is still reported"
    finally:
        watcher.close()


def test_a_directory_removed_then_created_later_is_watched_when_it_comes(tmp_path: Path) -> None:
    pending = tmp_path / "tasks" / "pending"
    pending.mkdir(parents=True)
    watcher = Watcher()
    try:
        watcher.watch(pending, PENDING_MASK)
        shutil.rmtree(pending)
        assert (None, OVERFLOW) not in (_events(watcher) if watcher.wait(0.5) else [])
        pending.mkdir()
        assert (None, OVERFLOW) in _events(watcher)
        (pending / "t1.json").write_text("{}")
        assert (pending, "t1.json") in _events(watcher)
    finally:
        watcher.close()


def test_what_arrives_whole_is_judged_at_once_what_may_be_written_after_the_grace(
        tmp_path: Path) -> None:
    (tmp_path / "being-written.json").write_text("{")
    (tmp_path / "elsewhere.json").write_text("{}")
    os.link(tmp_path / "elsewhere.json", tmp_path / "linked.json")
    (tmp_path / "dir").mkdir()
    assert settle_delay(tmp_path, "linked.json", 2.0) == 0
    assert settle_delay(tmp_path, "dir", 2.0) == 0
    assert settle_delay(tmp_path, "gone.json", 2.0) == 0
    assert settle_delay(tmp_path, "being-written.json", 2.0) == 2.0


def test_a_worker_keeps_serving_after_pending_is_replaced(home: Path, spool: Spool,
                                                          workers: Workers) -> None:
    workers.start(home)
    wait_ready(spool)
    _replace(spool.pending, "rmdir")
    task_id = submit(spool, craftsman="echo")
    assert wait_outcomes(spool, [task_id], timeout=20)[task_id]["status"] == "completed"


@pytest.mark.parametrize("keep_source", [True, False])
def test_a_file_delivered_by_link_is_completed_without_a_restart(
        home: Path, spool: Spool, workers: Workers, keep_source: bool) -> None:
    workers.start(home)
    wait_ready(spool)
    task = task_format.validate({"content": "linked", "craftsman": "echo"})
    source = home / "delivery.json"  # written elsewhere, then linked in: only IN_CREATE
    source.write_bytes(task_format.encode(task.raw))
    os.link(source, spool.pending / f"{task.id}.json")
    if not keep_source:
        source.unlink()  # maildir-style: link, then remove the first name
    outcome = wait_outcomes(spool, [task.id], timeout=10)[task.id]
    assert outcome["status"] == "completed" and json.dumps(outcome).count("linked") >= 1
