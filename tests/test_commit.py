"""Group commit (spool/commit.py): outcomes that finish together share their fsyncs, and nothing
reports an outcome (the worker's ledger record, hook and counts; `koubou wait`) before the
fsync that makes it durable. Real files; the directory fsyncs are watched through the one
function every spool fsync of a directory goes through (spool.durable.sync_dir)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from koubou_spool.spool import disk, durable
from koubou_spool.spool import task as task_format
from koubou_spool.spool.commit import GroupCommit, IdleAwareLoop
from koubou_spool.spool.files import Outcome, Spool
from koubou_spool.spool.ledger import LedgerWriter
from koubou_spool.work.publish import Publisher


class Syncs:
    """Every directory fsync and file flush, with what each covered: the names in the directory
    when the fsync began (renames made before the call), noted once it has returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.durable: dict[str, set[str]] = {}  # directory -> names a finished fsync covered
        self.flushed: set[str] = set()  # files whose fsync has returned
        self.calls: list[str] = []
        self.early: list[str] = []  # reports made before their fsync
        self.gate: threading.Event | None = None  # when set up, the first fsync of completed/ waits
        real_sync, real_flush = durable.sync_dir, disk.flush_files

        def sync_dir(path: str | os.PathLike) -> None:
            covered = set(os.listdir(path))
            first = str(path) not in self.calls and Path(path).name == "completed"
            self.calls.append(str(path))
            if self.gate is not None and first:
                assert self.gate.wait(10)
            real_sync(path)
            self.durable.setdefault(str(path), set()).update(covered)

        def flush_files(paths: list[str]) -> None:
            real_flush(paths)
            self.flushed.update(paths)

        monkeypatch.setattr(durable, "sync_dir", sync_dir)
        monkeypatch.setattr("koubou_spool.spool.outcomes.flush_files", flush_files)

    def is_durable(self, directory: Path, name: str) -> bool:
        return name in self.durable.get(str(directory), set())

    def check(self, directory: Path, name: str, what: str) -> None:
        """Note `what` if it happens before the fsync of `directory` covered `name` (noted, not
        raised: the group commit logs a reporter's exception and goes on with the others)."""
        if not self.is_durable(directory, name):
            self.early.append(f"{what} of {name} before the fsync of {directory.name}/")


async def settled(count: Any, seconds: float = 10) -> None:
    """Until count() is 0, for at most `seconds`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while count():
        assert loop.time() < deadline, "outcomes still not handed back"
        await asyncio.sleep(0.005)


def claimed(spool: Spool, n: int) -> list[tuple[Any, task_format.Task]]:
    """n tasks submitted and claimed by one worker id."""
    tasks = [task_format.validate({"content": f"task {i}", "id": f"t{i:03d}"}) for i in range(n)]
    spool.submit(tasks)
    return [(spool.claim(f"{t.id}.json", "w1"), t) for t in tasks]


def record_of(task: task_format.Task) -> dict[str, Any]:
    return task_format.completed_record(task, {"content": "done", "craftsman": "echo",
                                               "duration_s": 0.0, "usage": {}, "model": "m"})


def test_an_outcome_is_handed_back_only_after_its_file_and_directory_are_fsynced(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = Syncs(monkeypatch)
    seen: list[str] = []

    def done(outcome: Outcome) -> None:
        syncs.check(outcome.directory, f"{outcome.task_id}.json", "hand-back")
        if outcome.tmp is None or outcome.tmp not in syncs.flushed:
            syncs.early.append(f"hand-back of {outcome.task_id} before its file's fsync")
        # Its claim's marker stays until the ledger has the record: the worker unmarks it then.
        if outcome.placed and os.path.lexists(outcome.finishing):
            spool.unmark(outcome)
            seen.append(outcome.task_id)

    async def main() -> None:
        commits = GroupCommit(spool, asyncio.get_running_loop())
        for claim, task in claimed(spool, 20):
            outcome = spool.fence(claim, task.id, record_of(task))
            commits.add(outcome, done)
        await settled(lambda: commits.pending)
        commits.close()

    asyncio.run(main())
    assert syncs.early == []
    assert sorted(seen) == [f"t{i:03d}" for i in range(20)]


def test_outcomes_that_finish_while_a_round_runs_share_the_next_rounds_fsync(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = Syncs(monkeypatch)
    syncs.gate = threading.Event()
    seen: list[str] = []

    async def main() -> None:
        commits = GroupCommit(spool, asyncio.get_running_loop())
        work = claimed(spool, 11)
        first, rest = work[0], work[1:]
        commits.add(spool.fence(first[0], first[1].id, record_of(first[1])),
                    lambda o: seen.append(o.task_id))
        await settled(lambda: str(spool.completed) not in syncs.calls)  # the first round is
        # in its fsync of completed/, held there
        for claim, task in rest:
            commits.add(spool.fence(claim, task.id, record_of(task)),
                        lambda o: seen.append(o.task_id))
        await asyncio.sleep(0.05)
        assert seen == []  # nothing reported while its fsync has not returned
        syncs.gate.set()
        await settled(lambda: commits.pending)
        commits.close()

    asyncio.run(main())
    assert len(seen) == 11
    assert syncs.calls.count(str(spool.completed)) == 2  # ten outcomes, one fsync between them


def test_the_ledger_record_the_hook_and_the_count_come_after_the_fsync(
        spool: Spool, home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = Syncs(monkeypatch)
    ledger = LedgerWriter(home / "db" / "koubou.db")
    publisher = Publisher(spool, ledger, {}, lambda claim: None)
    reports: list[str] = []

    def reported(what: str, task_id: str) -> None:
        syncs.check(spool.completed, f"{task_id}.json", what)
        reports.append(f"{what} {task_id}")

    monkeypatch.setattr(publisher, "_on_finish",
                        lambda task_id, record: reported("on_finish", task_id))
    real_finished = ledger.attempt_finished

    def attempt_finished(task_id: str, *args: Any, **kwargs: Any) -> Any:
        reported("ledger", task_id)
        return real_finished(task_id, *args, **kwargs)

    monkeypatch.setattr(ledger, "attempt_finished", attempt_finished)

    async def main() -> None:
        for claim, task in claimed(spool, 5):
            result = {"content": "done", "craftsman": "echo", "duration_s": 0.0, "usage": {},
                      "model": "m"}
            publisher.complete(claim, task, 1, result, None)
        await settled(lambda: publisher.committing)
        publisher.close()

    asyncio.run(main())
    ledger.close()
    assert syncs.early == []
    assert publisher.done == 5
    assert os.listdir(spool.in_progress) == []  # each marker removed once the ledger had it
    assert sorted(reports) == sorted(f"{w} t{i:03d}" for i in range(5) for w in ("ledger", "on_finish"))


def test_a_waiter_makes_the_outcome_it_saw_durable_before_returning(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = Syncs(monkeypatch)
    # An outcome renamed into completed/ whose worker has not fsynced the directory yet.
    tmp = spool._write_tmp("x", task_format.encode({"id": "x", "status": "completed"}))
    os.rename(tmp, spool.completed / "x.json")
    assert not syncs.is_durable(spool.completed, "x.json")
    assert spool.wait_for_outcomes({"x.json"}, 5) == {"x.json"}
    assert syncs.is_durable(spool.completed, "x.json")


def test_without_fsync_an_outcome_is_written_and_handed_back_at_once(home: Path) -> None:
    spool = Spool(home, fsync=False)
    (claim, task), = claimed(spool, 1)
    seen = []
    loop = asyncio.new_event_loop()  # never run: nothing is handed over through it
    commits = GroupCommit(spool, loop)
    commits.add(spool.fence(claim, task.id, record_of(task)), seen.append)
    loop.close()
    assert [o.task_id for o in seen] == [task.id] and seen[0].placed
    assert (spool.completed / f"{task.id}.json").exists()
    assert commits.pending == 0


def test_a_worker_killed_between_the_fsync_and_the_ledger_record_leaves_it_to_recovery(
        spool: Spool, home: Path) -> None:
    from koubou_spool.config import SpoolSettings
    from koubou_spool.spool.recovery import recover_orphans
    (claim, task), = claimed(spool, 1)
    result = {"content": "done", "craftsman": "echo", "duration_s": 0.0, "attempts": 1,
              "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
              "model": "m", "cost_usd": 0.0, "finished_at": task_format.iso(1e9)}
    outcome = spool.fence(claim, task.id, task_format.completed_record(task, result))
    spool.write_outcomes([outcome])  # durable; the worker dies before the ledger has it
    assert os.path.lexists(outcome.finishing)
    ledger = LedgerWriter(home / "db" / "koubou.db")
    try:
        recovered = recover_orphans(spool, SpoolSettings(), "w2", ledger)
    finally:
        ledger.close()
    assert [r.action for r in recovered] == ["kept"]
    assert os.listdir(spool.in_progress) == []
    conn = sqlite3.connect(home / "db" / "koubou.db")
    try:
        row = conn.execute("SELECT attempt, outcome, total_tokens FROM attempts WHERE task_id = ?",
                           (task.id,)).fetchone()
    finally:
        conn.close()
    assert row == (1, "completed", 3)


def test_on_the_workers_loop_a_round_starts_only_once_the_loop_has_run_what_it_had(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's loop (IdleAwareLoop) wakes the commit thread when it has nothing left to
    # run: the next task's claim and request go first, not behind the round for the GIL. On a
    # plain loop the thread is woken at the next iteration, during the chain below.
    steps: list[str] = []
    real_write = Spool.write_outcomes

    def write_outcomes(self: Spool, outcomes: list[Outcome]) -> None:
        steps.append("round")
        real_write(self, outcomes)
    monkeypatch.setattr(Spool, "write_outcomes", write_outcomes)
    seen: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        commits = GroupCommit(spool, loop)
        (first, first_task), (claim, task) = claimed(spool, 2)
        commits.add(spool.fence(first, first_task.id, record_of(first_task)), lambda o: None)
        await settled(lambda: commits.pending)  # the thread started, and waits for work
        steps.clear()

        def step(n: int) -> None:  # the next attempt's work, a few callbacks long
            time.sleep(0.02)
            steps.append(f"step {n}")
            if n < 3:
                loop.call_soon(step, n + 1)
        commits.add(spool.fence(claim, task.id, record_of(task)),
                    lambda o: seen.append(o.task_id))
        loop.call_soon(step, 1)
        await settled(lambda: commits.pending)
        commits.close()

    with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
        runner.run(main())
    assert steps == ["step 1", "step 2", "step 3", "round"]
    assert seen == ["t001"]
