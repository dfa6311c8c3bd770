"""The spool's file moves: atomic submit, one owner per claim, fencing, rejects."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys


import time
from pathlib import Path

import pytest

from conftest import read_json, submit
from koubou_spool.spool import task as task_format
from koubou_spool.errors import SpoolError, TaskNotFound
from koubou_spool.spool.files import Refused, Spool


def test_open_refuses_a_directory_that_is_not_a_home(tmp_path: Path) -> None:
    with pytest.raises(SpoolError, match="run `koubou init"):
        Spool.open(tmp_path)


def test_submit_is_atomic_and_leaves_no_temporaries(spool: Spool) -> None:
    task_id = submit(spool, content="hi", priority=7)
    assert os.listdir(spool.pending) == [f"{task_id}.json"]
    assert [n for n in os.listdir(spool.tmp)] == []
    stored = read_json(spool.pending / f"{task_id}.json")
    assert stored["content"] == "hi" and stored["priority"] == 7 and stored["id"] == task_id
    assert "submitted_at" in stored


def test_a_batch_larger_than_the_descriptor_limit_is_queued_whole(spool: Spool) -> None:
    # Its files are flushed together (one journal commit), yet never all open at once: a
    # normal user's limit is often 1,024 descriptors (seen: EMFILE at 1,524 tasks).
    assert spool.fsync
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 200, hard))
    try:
        spool.submit([task_format.validate({"content": f"t{i}"}) for i in range(600)])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(os.listdir(spool.pending)) == 600 and os.listdir(spool.tmp) == []


def test_resubmitting_an_id_is_idempotent_in_every_state(spool: Spool) -> None:
    task = task_format.validate({"id": "nightly", "content": "a"})
    assert spool.submit([task])[0][1:] == ("pending", True)
    again = task_format.validate({"id": "nightly", "content": "changed"})
    assert spool.submit([again])[0][1:] == ("pending", False)
    assert read_json(spool.pending / "nightly.json")["content"] == "a"
    claim = spool.claim("nightly.json", "w-1-aaaa")
    assert spool.submit([again])[0][1:] == ("in_progress", False)
    spool.publish(claim, "nightly", task_format.completed_record(task, {"content": "ok"}))
    assert spool.submit([again])[0][1:] == ("completed", False)
    assert os.listdir(spool.pending) == []


def test_a_claim_still_finishing_beside_its_outcome_is_completed(spool: Spool) -> None:
    # publish places the outcome, then unlinks the claim: between the two, a resubmission
    # (a workflow queued again right after its --wait) said "already in_progress".
    task = task_format.validate({"id": "nightly", "content": "a"})
    spool.submit([task])
    claim = spool.claim("nightly.json", "w-1-aaaa")
    spool.publish(claim, "nightly", task_format.completed_record(task, {"content": "ok"}))
    (spool.in_progress / f"{claim.file_name}.fin").write_text("")  # the moment before unlink
    assert spool.submit([task])[0][1:] == ("completed", False)


def test_a_resubmitted_id_claimed_while_the_batch_is_queued_is_not_queued_again(
        spool: Spool) -> None:
    spool.submit([task_format.validate({"id": "nightly", "content": "a"})])

    def batch():  # a large batch: a worker claims "nightly" before its line is reached
        yield task_format.validate({"id": "other", "content": "b"})
        assert spool.claim("nightly.json", "w-1-aaaa") is not None
        yield task_format.validate({"id": "nightly", "content": "a"})

    queued = [(task.id, state, new) for task, state, new in spool.submit(batch())]
    assert queued == [("other", "pending", True), ("nightly", "in_progress", False)]
    assert os.listdir(spool.pending) == ["other.json"]


def test_a_task_is_claimed_by_exactly_one_worker(spool: Spool) -> None:
    submit(spool, id="t1")
    first = spool.claim("t1.json", "w-1-aaaa")
    second = spool.claim("t1.json", "w-2-bbbb")
    assert first is not None and second is None
    assert os.listdir(spool.in_progress) == [first.file_name]
    assert first.file_name.startswith("t1.json@w-1-aaaa+")


def test_a_revoked_claim_cannot_publish(spool: Spool) -> None:
    task = task_format.validate({"id": "t1", "content": "x"})
    spool.submit([task])
    claim = spool.claim("t1.json", "w-1-aaaa")
    assert spool.requeue(claim.file_name, attempts=1)  # e.g. its lease expired
    assert not spool.publish(claim, "t1", task_format.completed_record(task, {"content": "late"}))
    assert os.listdir(spool.completed) == []
    assert read_json(spool.pending / "t1.json")["attempts"] == 1
    assert os.listdir(spool.tmp) == []


def test_a_revoked_claim_writes_nothing_into_tmp(spool: Spool) -> None:
    """The fence comes before the write: a late outcome costs one failed rename, no file."""
    from inotify_simple import INotify, flags
    task = task_format.validate({"id": "t1", "content": "x"})
    spool.submit([task])
    claim = spool.claim("t1.json", "w-1-aaaa")
    assert spool.requeue(claim.file_name, attempts=1)
    with INotify() as watch:
        watch.add_watch(spool.tmp, flags.CREATE | flags.MOVED_TO | flags.MODIFY)
        assert not spool.publish(claim, "t1", task_format.completed_record(task, {"content": "x"}))
        assert watch.read(timeout=0) == []  # not even a staging file for a moment
    assert os.listdir(spool.tmp) == []


def test_a_requeue_racing_a_cancel_never_brings_the_task_back(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou_spool.service import control
    task_id = submit(spool, content="x")
    claim = spool.claim(f"{task_id}.json", "w-1-aaaa")
    write_tmp = spool._write_tmp
    cancels = []

    def cancel_meanwhile(label: str, data: bytes) -> str:  # `koubou cancel` lands mid-requeue
        if not cancels:
            cancels.append(label)
            try:
                control.cancel(spool, spool.home / "db" / "koubou.db", task_id)
            except control.NotCancelled:
                pass  # the requeue had fenced the claim first
        return write_tmp(label, data)

    monkeypatch.setattr(spool, "_write_tmp", cancel_meanwhile)
    spool.requeue(claim.file_name, attempts=1)
    monkeypatch.undo()
    places = [d for d in ("pending", "failed") if os.listdir(spool.state_dir(d))]
    assert len(places) == 1, f"the task is in {places}"
    assert os.listdir(spool.in_progress) == []


def test_a_second_outcome_for_an_id_is_refused_not_written_over_the_first(spool: Spool) -> None:
    tasks = [task_format.validate({"id": "t1", "content": n}) for n in ("one", "two")]
    for name, task in zip(("a.json", "b.json"), tasks, strict=True):
        (spool.pending / name).write_bytes(task_format.encode(task.raw))
    claims = [spool.claim(name, "w-1-aaaa") for name in ("a.json", "b.json")]
    records = [task_format.completed_record(t, {"content": t.content}) for t in tasks]
    assert spool.publish(claims[0], "t1", records[0])
    assert not spool.publish(claims[1], "t1", records[1])
    assert read_json(spool.completed / "t1.json")["result"] == {"content": "one"}
    assert (spool.failed / "b.json").exists() and os.listdir(spool.in_progress) == []
    reason = read_json(spool.failed / "b.json.error.json")["error"]["message"]
    assert "an outcome for id t1 already exists" in reason


def test_publish_moves_the_claim_to_its_outcome(spool: Spool) -> None:
    task = task_format.validate({"id": "t1", "content": "x"})
    spool.submit([task])
    claim = spool.claim("t1.json", "w-1-aaaa")
    assert spool.publish(claim, "t1", task_format.completed_record(task, {"content": "done"}))
    assert os.listdir(spool.in_progress) == [] and os.listdir(spool.pending) == []
    assert read_json(spool.completed / "t1.json")["result"] == {"content": "done"}


def test_reject_moves_bytes_unchanged_with_a_sidecar(spool: Spool) -> None:
    data = b'{"content": \x00 not json'
    (spool.pending / "bad.json").write_bytes(data)
    assert spool.reject(spool.pending, "bad.json", "not valid JSON") == "bad.json"
    assert (spool.failed / "bad.json").read_bytes() == data
    sidecar = read_json(spool.failed / "bad.json.error.json")
    assert sidecar["error"]["kind"] == "invalid" and sidecar["error"]["message"] == "not valid JSON"
    found = spool.find("bad.json")
    assert found.state == "failed" and found.rejected


def test_a_second_reject_of_the_same_name_keeps_both(spool: Spool) -> None:
    for body in (b"one", b"two"):
        (spool.pending / "x.json").write_bytes(body)
        spool.reject(spool.pending, "x.json", "bad")
    kept = sorted(p.read_bytes() for p in spool.failed.iterdir() if not p.name.endswith("error.json"))
    assert kept == [b"one", b"two"]


def test_entries_that_are_not_regular_files_are_refused_without_reading(spool: Spool,
                                                                        tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text('{"content": "do not read me"}')
    os.symlink(secret, spool.pending / "link.json")
    os.mkfifo(spool.pending / "fifo.json")  # opening it for reading would block forever
    (spool.pending / "dir.json").mkdir()
    for name, reason in [("link.json", "symbolic link"), ("fifo.json", "FIFO"),
                         ("dir.json", "directory")]:
        with pytest.raises(Refused, match=reason):
            spool.read_entry(spool.pending, name)
        spool.reject(spool.pending, name, reason)
    assert os.path.islink(spool.failed / "link.json")
    assert (spool.failed / "dir.json").is_dir()


def test_oversized_files_are_refused_by_size(spool: Spool) -> None:
    small = Spool(spool.home, max_task_bytes=100)
    (spool.pending / "big.json").write_bytes(b" " * 101)
    with pytest.raises(Refused, match="101 bytes, over spool.max_task_bytes"):
        small.read_entry(spool.pending, "big.json")


def test_find_reports_each_state(spool: Spool) -> None:
    submit(spool, id="p1")
    assert spool.find("p1").state == "pending"
    spool.claim("p1.json", "w-1-aaaa")
    assert spool.find("p1").state == "in_progress"
    (spool.pending / "dropped-name.json").write_text('{"id": "inner", "content": "x"}')
    assert spool.find("inner").path.name == "dropped-name.json"
    with pytest.raises(TaskNotFound):
        spool.find("nope")


def test_dead_worker_claims_are_orphaned_live_ones_are_not(spool: Spool) -> None:
    submit(spool, id="a")
    submit(spool, id="b")
    fd = spool.register_worker("me-1-aaaa", {})
    spool.claim("a.json", "me-1-aaaa")
    spool.claim("b.json", "gone-2-bbbb")  # no lock file: its process is gone
    [(orphan, state)] = spool.orphaned_claims(lease_s=60)
    assert orphan.startswith("b.json@gone-2-bbbb+") and state == "dead"
    # Alive but stale (SIGSTOPped): its lock is held and its heartbeat stops changing for
    # lease_s, on this process's own clock.
    [orphan] = spool.orphaned_claims(lease_s=0.2)
    assert orphan[1] == "dead"
    time.sleep(0.3)
    assert ("a.json@me-1-aaaa", "stale") in [(o.split("+")[0], s)
                                             for o, s in spool.orphaned_claims(lease_s=0.2)]
    spool.unregister_worker("me-1-aaaa", fd)


def test_a_clock_step_never_makes_a_live_worker_stale(spool: Spool) -> None:
    submit(spool, id="a")
    fd = spool.register_worker("me-1-aaaa", {})
    spool.claim("a.json", "me-1-aaaa")
    for step in (-3600, 3600, -86400):  # this recoverer's clock jumped (or a suspend ended)
        moment = time.time() + step
        os.utime(fd, (moment, moment))  # the peer's heartbeat, by the peer's clock
        assert spool.orphaned_claims(lease_s=0.2) == [], f"stolen after a {step} s step"
    time.sleep(0.3)  # and no heartbeat since: now it is stale
    assert [s for _, s in spool.orphaned_claims(lease_s=0.2)] == ["stale"]
    spool.unregister_worker("me-1-aaaa", fd)


@pytest.mark.parametrize("durable", [True, False])
def test_spool_fsync_false_skips_every_fsync(home: Path, monkeypatch: pytest.MonkeyPatch,
                                             durable: bool) -> None:
    spool = Spool(home, fsync=durable)
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    task = task_format.validate({"id": "t1", "content": "x"})
    spool.submit([task])
    claim = spool.claim("t1.json", "w-1-aaaa")
    assert spool.publish(claim, "t1", task_format.completed_record(task, {"content": "ok"}))
    # submit: file + pending/; outcome: file + completed/ (+ in_progress/ for the fence)
    assert (len(synced) >= 4) if durable else synced == []


def test_a_task_unreadable_for_lack_of_descriptors_is_not_refused(spool: Spool) -> None:
    # EMFILE for real: a child process with RLIMIT_NOFILE low and every descriptor taken.
    submit(spool, id="t1")
    script = """
import os, resource, sys
from pathlib import Path
from koubou_spool.spool.files import Refused, Spool
spool = Spool(Path(sys.argv[1]))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    spool.read_entry(spool.pending, "t1.json")
    print("read")
except Refused as exc:
    print("Refused", exc)
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    child = subprocess.run([sys.executable, "-c", script, str(spool.home)], capture_output=True,
                           text=True, timeout=60)
    assert child.stdout.startswith("Unavailable "), child.stdout + child.stderr
    assert "Too many open files" in child.stdout
    assert os.listdir(spool.pending) == ["t1.json"]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOMEM,
                                  errno.ENOBUFS])
@pytest.mark.parametrize("at", ["open", "read"])
def test_transient_errors_while_reading_are_not_a_verdict_on_the_file(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, code: int, at: str) -> None:
    from koubou_spool.spool import disk, files
    submit(spool, id="t1")

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    if at == "open":
        real_open = os.open
        monkeypatch.setattr(disk.os, "open", lambda path, *a, **k: fail() if str(path).endswith(
            "t1.json") else real_open(path, *a, **k))
    else:
        monkeypatch.setattr(disk, "_read_all", fail)
    with pytest.raises(files.Unavailable, match=os.strerror(code)):
        spool.read_entry(spool.pending, "t1.json")
    assert spool.requeue(spool.claim("t1.json", "w-1-aaaa").file_name, attempts=2)
    assert os.listdir(spool.pending) == ["t1.json"]  # back, uncounted, rather than stuck
