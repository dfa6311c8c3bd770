"""Real worker processes against the loopback fake server: the guarantees (README: How it keeps
its promises)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import (Workers, assert_no_claims, finished_attempt, log_of, read_json, submit,
                      wait_file, wait_outcomes, wait_ready, wait_worker_row, write_config)
from fake_openai import FakeOpenAI
from koubou_spool.spool import ledger, task as task_format
from koubou_spool.spool.files import Spool


def test_a_task_reaches_the_craftsman_and_its_outcome_is_recorded(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    workers.start(home)
    task_id = submit(spool, content="review the diff", type="code_review", metadata={"pr": 7})
    outcome = wait_outcomes(spool, [task_id])[task_id]
    assert outcome["status"] == "completed"
    assert outcome["type"] == "code_review" and outcome["metadata"] == {"pr": 7}
    result = outcome["result"]
    assert result["content"] == "echo: review the diff"
    assert result["craftsman"] == "local" and result["model"] == "fake-model"
    assert result["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert result["attempts"] == 1 and result["cost_usd"] == 0
    for key in ("queued_at", "started_at", "finished_at"):
        task_format.parse_iso(result[key])
    body = fake_openai.completions()[0]
    assert body["max_tokens"] == 64  # always sent
    assert body["messages"][-1] == {"role": "user", "content": "review the diff"}
    row = finished_attempt(home, task_id, "attempt, outcome, craftsman, prompt_tokens,"
                           " completion_tokens, total_tokens, cost_usd")
    assert row == (1, "completed", "local", 3, 4, 7, 0.0)


def test_a_worker_runs_without_psycopg_and_loads_openai_only_for_a_request(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    # psycopg is the optional `cluster` extra; the openai SDK costs a second of CPU to import.
    script = """
import sys
sys.modules["psycopg"] = None  # import psycopg raises ImportError, as where it is absent
from pathlib import Path
from koubou_spool import config
from koubou_spool.craft.backends import make_backend
from koubou_spool.work import worker
make_backend(config.load(Path(sys.argv[1])).craftsmen["local"])  # what a worker's start does
assert "openai" not in sys.modules, "openai imported before any request"
"""
    subprocess.run([sys.executable, "-c", script, str(home / "config" / "koubou.yaml")],
                   check=True, timeout=60)
    task_id = submit(spool, content="hello", craftsman="local")
    log = tmp_path / "drain.log"
    drain = f"""
import sys
sys.modules["psycopg"] = None
from koubou_spool.cli.koubou import main
sys.argv = ["koubou", "worker", "--home", {str(home)!r}, "--drain"]
main()
"""
    with log.open("wb") as out:
        done = subprocess.run([sys.executable, "-c", drain], stdout=out, stderr=subprocess.STDOUT,
                              timeout=60)
    assert done.returncode == 0, log.read_text()
    outcome = wait_outcomes(spool, [task_id])[task_id]
    assert outcome["status"] == "completed" and outcome["result"]["content"] == "echo: hello"


def test_priority_ten_runs_first_and_fifo_within_a_priority(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    ids = [submit(spool, id=f"p{priority}-{n}", priority=priority)
           for n in range(3) for priority in (1, 5, 10)]
    workers.start(home, "--concurrency", "1", "--drain").wait(timeout=30)
    order = [b["messages"][-1]["content"] for b in fake_openai.completions()]
    assert len(order) == len(ids)
    started = sorted(ids, key=lambda i: read_json(spool.completed / f"{i}.json")
                     ["result"]["started_at"])
    assert started == [f"p{p}-{n}" for p in (10, 5, 1) for n in range(3)]


def test_file_written_in_slow_chunks_is_completed_not_rejected(
        home: Path, spool: Spool, workers: Workers) -> None:
    workers.start(home)
    wait_ready(spool)
    path = spool.pending / "slow.json"
    chunks = [b'{"content": "wri', b'tten slowly", "prio', b'rity": 6}']
    with open(path, "wb") as out:  # one writer, like cp, pausing between chunks
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            time.sleep(0.4)
    with open(spool.pending / "appended.json", "ab") as out:  # a writer closing between chunks
        out.write(chunks[0])
    for chunk in chunks[1:]:
        time.sleep(0.2)
        with open(spool.pending / "appended.json", "ab") as out:
            out.write(chunk)
    outcomes = wait_outcomes(spool, ["slow", "appended"])
    assert all(o["status"] == "completed" for o in outcomes.values())
    assert outcomes["slow"]["result"]["content"] == "echo: written slowly"
    assert not any(n.endswith(".error.json") for n in os.listdir(spool.failed))


BAD_INPUTS = {
    "bad.json": b'{"content": "unterminated',
    "array.json": b'[{"content": "x"}]',
    "missing.json": b'{"priority": 3}',
    "number.json": b'{"content": 42}',
    "priority.json": b'{"content": "x", "priority": "high"}',
    "binary.json": bytes(range(256)),
    "empty.json": b"",
    "escape.json": b'{"content": "x", "id": "../../etc/passwd"}',
    # issue 18: each of these killed the worker or was run instead of refused
    "not-before-number.json": b'{"content": "x", "not_before": 1700000000}',
    "not-before-null.json": b'{"content": "x", "not_before": null}',
    "expires-list.json": b'{"content": "x", "expires_at": []}',
    "submitted-object.json": b'{"content": "x", "submitted_at": {}}',
    "after-string.json": b'{"content": "x", "after": "other"}',
    "after-null.json": b'{"content": "x", "after": null}',
    "files-object.json": b'{"content": "x", "files": {"a": 1}}',
    "files-number.json": b'{"content": "x", "files": [1]}',
    "priority-null.json": b'{"content": "x", "priority": null}',
    "priority-float.json": b'{"content": "x", "priority": 5.5}',
    "priority-huge.json": b'{"content": "x", "priority": 1e400}',
    "attempts-huge.json": b'{"content": "x", "attempts": 100000000000000000000000}',
    "max-tokens-digits.json": b'{"content": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    "temperature-nan.json": b'{"content": "x", "temperature": NaN}',
    "timeout-infinity.json": b'{"content": "x", "timeout_s": Infinity}',
    "metadata-nan.json": b'{"content": "x", "metadata": {"score": NaN}}',
    "nested-deep.json": b'{"content": "x", "context": {"a": ' + b"[" * 100_000
                        + b"]" * 100_000 + b"}}",
    "utf8-invalid.json": b'{"content": "caf\xc3\x28 \xff"}',
    "bom.json": b'\xef\xbb\xbf{"content": "x"}',
    "top-number.json": b"42",
    "top-string.json": b'"do the thing"',
    "top-null.json": b"null",
    "duplicate-keys.json": b'{"content": "a", "content": "b"}',
    "lone-surrogate.json": b'{"content": "x \\ud800 y"}',
    "batch-part-number.json": b'{"custom_id": "b1", "body": {"messages": '
                              b'[{"role": "user", "content": [{"text": 5}]}]}}',
    "batch-body-null.json": b'{"custom_id": "b2", "body": null}',
    "batch-message-string.json": b'{"custom_id": "b3", "body": {"messages": ["hi"]}}',
    "context-list.json": b'{"content": "x", "context": [1]}',
    "content-blank.json": b'{"content": "   "}',
    "type-number.json": b'{"content": "x", "type": 7}',
    "sensitivity-list.json": b'{"content": "x", "sensitivity": ["confidential"]}',
    "id-too-long.json": b'{"content": "x", "id": "' + b"a" * 200 + b'"}',
    "created-by-number.json": b'{"content": "x", "created_by": 5}',
    "max-attempts-zero.json": b'{"content": "x", "max_attempts": 0}',
}
LONG_NAME = "n" * 245 + ".json"  # the claim's rename would pass NAME_MAX
ODD_NAME = os.fsdecode(b"odd-\xff\xfe.json")  # a name that is not UTF-8


def drop_bad_inputs(directory: Path, stage: Path) -> set[str]:
    """Every kind of bad input, staged and renamed into `directory` at once; their names."""
    stage.mkdir()
    for name, data in BAD_INPUTS.items():
        (stage / name).write_bytes(data)
    (stage / "large.json").write_bytes(b'{"content": "' + b"x" * 300_000 + b'"}')
    (stage / LONG_NAME).write_bytes(b'{"content": "a valid task under a name too long"}')
    (stage / ODD_NAME).write_bytes(b"not json at all")
    target = stage.parent / "target.json"
    target.write_text('{"content": "read through a link"}')
    os.symlink(target, stage / "link.json")
    (stage / "directory.json").mkdir()
    os.mkfifo(stage / "fifo.json")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(stage / "socket.json"))
    server.close()
    names = set(os.listdir(stage))
    for name in names:
        os.rename(stage / name, directory / name)
    return names


def test_each_kind_of_bad_input_lands_in_failed_with_its_reason(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.symlink(allowed / "loop", allowed / "loop")
    write_config(home, fake_openai.base_url, spool={"max_task_bytes": 300_000, "grace_s": 0.3},
                 attach={"allowed_dirs": [str(allowed)]})
    proc = workers.start(home)
    wait_ready(spool)
    invalid_files = {"loop": [str(allowed / "loop")], "nul": ["/tmp/a\0b"]}
    expected = drop_bad_inputs(spool.pending, tmp_path / "stage")
    for task_id, files in invalid_files.items():  # valid tasks whose attachments cannot be read
        (spool.pending / f"{task_id}.json").write_text(json.dumps({"content": "x",
                                                                   "files": files}))
    assert len(expected) + len(invalid_files) >= 50
    rejected = {}
    for name in expected:
        sidecar = long_name_sidecar(spool) if name == LONG_NAME else name + ".error.json"
        wait_file(spool.failed, sidecar, timeout=20)
        rejected[name] = read_json(spool.failed / sidecar)
    for task_id in invalid_files:
        outcome = wait_outcomes(spool, [task_id])[task_id]
        assert outcome["error"]["kind"] == "invalid" and "files:" in outcome["error"]["message"]
    for name, data in BAD_INPUTS.items():
        assert (spool.failed / name).read_bytes() == data, name
    reasons = {n: r["error"]["message"] for n, r in rejected.items()}
    assert "not valid JSON" in reasons["bad.json"]
    assert "expected a JSON object" in reasons["array.json"]
    assert "content: required" in reasons["missing.json"]
    assert "priority: expected an integer" in reasons["priority.json"]
    assert "not UTF-8" in reasons["binary.json"]
    assert "empty" in reasons["empty.json"]
    assert "id: expected" in reasons["escape.json"]
    assert "over spool.max_task_bytes" in reasons["large.json"]
    assert "symbolic link" in reasons["link.json"]
    assert "directory" in reasons["directory.json"]
    assert "FIFO" in reasons["fifo.json"] and "FIFO or socket" in reasons["socket.json"]
    assert "not_before: expected an ISO-8601 time" in reasons["not-before-number.json"]
    assert "not_before: expected" in reasons["not-before-null.json"]
    assert "nested too deeply" in reasons["nested-deep.json"]
    assert "duplicate key" in reasons["duplicate-keys.json"]
    assert "NaN" in reasons["temperature-nan.json"]
    assert "surrogate" in reasons["lone-surrogate.json"]
    assert "body.messages" in reasons["batch-part-number.json"]
    assert "name is too long" in reasons[LONG_NAME]
    assert rejected[LONG_NAME]["original_name"] == LONG_NAME
    for name, reason in reasons.items():
        assert reason and "Error" not in reason, (name, reason)  # a reason, not an exception
    assert os.path.islink(spool.failed / "link.json")
    assert target_unchanged(tmp_path)
    assert os.listdir(spool.pending) == []
    assert_no_claims(spool)
    # the worker is still serving
    task_id = submit(spool, content="still alive")
    assert wait_outcomes(spool, [task_id])[task_id]["status"] == "completed"
    assert proc.poll() is None
    assert "Traceback" not in log_of(proc)
    out = subprocess.run([sys.executable, "-m", "koubou_spool.cli.koubou", "status", "bad.json",
                          "--json"], capture_output=True, text=True, check=True)
    assert '"rejected": true' in out.stdout and "not valid JSON" in out.stdout


def long_name_sidecar(spool: Spool, timeout: float = 20) -> str:
    """The sidecar of LONG_NAME, rejected under a shorter name that leaves room for it."""
    deadline = time.monotonic() + timeout
    while True:
        found = [n for n in os.listdir(spool.failed)
                 if n.startswith("nnnnnnnn") and n.endswith(".error.json")]
        if found:
            return found[0]
        assert time.monotonic() < deadline, "the file with the long name was not rejected"
        threading.Event().wait(0.1)


def target_unchanged(tmp_path: Path) -> bool:
    return (tmp_path / "target.json").read_text() == '{"content": "read through a link"}'


def test_maintain_survives_every_kind_of_bad_input(home: Path, spool: Spool,
                                                   tmp_path: Path) -> None:
    names = drop_bad_inputs(spool.pending, tmp_path / "stage")
    for name in sorted(names - {LONG_NAME})[:10]:  # a dead worker's claims, for recovery
        os.rename(spool.pending / name, spool.in_progress / f"{name}@deadhost-1-dead")
    done = subprocess.run([sys.executable, "-m", "koubou_spool.cli.koubou", "maintain",
                           "--home", str(home), "--purge-after", "1d"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert set(os.listdir(spool.pending)) == names  # judged by workers, not by maintain
    assert os.listdir(spool.in_progress) == []


def test_fencing_a_worker_whose_claim_was_revoked_cannot_complete(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.latency_s = 1.0
    proc = workers.start(home, "--concurrency", "1")  # the marker below runs after the slow one
    task_id = submit(spool, content="slow one")
    assert fake_openai.request_seen.wait(10)
    [claim] = os.listdir(spool.in_progress)
    # Revoke the claim as lease recovery or cancel would: move it away from its owner.
    os.rename(spool.in_progress / claim, spool.failed / "revoked.json")
    fake_openai.latency_s = 0
    marker = submit(spool, content="after")
    wait_outcomes(spool, [marker])
    assert not (spool.completed / f"{task_id}.json").exists()
    assert "revoked" in log_of(proc)
    assert not [n for n in os.listdir(spool.in_progress) if n.startswith(task_id)]


def test_sigterm_finishes_tasks_in_flight_then_exits_zero(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.latency_s = 3  # the 4 stay in flight while a loaded machine counts them
    proc = workers.start(home)
    ids = [submit(spool, content=f"t{i}") for i in range(6)]  # 4 in flight, 2 queued
    while len(os.listdir(spool.in_progress)) < 4:
        assert fake_openai.request_seen.wait(10)
        fake_openai.request_seen.clear()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    done = [i for i in ids if (spool.completed / f"{i}.json").exists()]
    queued = [i for i in ids if (spool.pending / f"{i}.json").exists()]
    assert len(done) >= 4 and len(done) + len(queued) == 6
    assert os.listdir(spool.in_progress) == []
    assert not os.listdir(spool.workers)


def test_sigterm_past_the_grace_requeues_without_counting_an_attempt(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, spool={"stop_grace_s": 0.2})
    fake_openai.latency_s = 5
    proc = workers.start(home)
    task_id = submit(spool, content="long")
    assert fake_openai.request_seen.wait(10)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert "attempts" not in read_json(spool.pending / f"{task_id}.json")
    assert os.listdir(spool.in_progress) == []


def test_kill_9_mid_task_is_requeued_with_the_attempt_counted(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.latency_s = 2
    victim = workers.start(home)
    task_id = submit(spool, content="survive")
    assert fake_openai.request_seen.wait(10)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    fake_openai.latency_s = 0
    workers.start(home)  # a new worker takes over the dead one's claim at start
    outcome = wait_outcomes(spool, [task_id])[task_id]
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 2


def test_server_errors_are_retried_as_new_attempts_then_fail_as_backend(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.fail_next = 1
    workers.start(home)
    recovered = submit(spool, content="flaky")
    assert wait_outcomes(spool, [recovered])[recovered]["result"]["attempts"] == 2
    fake_openai.fail_next = 100
    doomed = submit(spool, content="down", max_attempts=3)
    error = wait_outcomes(spool, [doomed])[doomed]["error"]
    assert error["kind"] == "backend" and error["attempts"] == 3
    assert "HTTP 500" in error["message"]


def test_a_client_error_fails_at_once_with_the_servers_message(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.reject_next = 1
    workers.start(home)
    task_id = submit(spool, content="too long")
    error = wait_outcomes(spool, [task_id])[task_id]["error"]
    assert error["kind"] == "backend" and error["attempts"] == 1
    assert "maximum context length" in error["message"]
    assert len(fake_openai.completions()) == 1


def test_429_is_retried_by_the_client_honouring_retry_after(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, craftsmen={
        "local": {"backend": "openai", "base_url": fake_openai.base_url, "model": "fake-model",
                  "retries": 2, "max_concurrent": 1}})
    fake_openai.rate_limit_next = 2
    fake_openai.retry_after_s = 0.3
    workers.start(home)
    task_id = submit(spool, content="limited")
    outcome = wait_outcomes(spool, [task_id])[task_id]
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 1
    times = [r["at"] for r in fake_openai.requests]
    assert len(times) == 3 and times[1] - times[0] >= 0.25 and times[2] - times[1] >= 0.25


def test_a_locked_ledger_does_not_stop_local_work(
        home: Path, spool: Spool, workers: Workers) -> None:
    ledger_path = home / "db" / "koubou.db"
    workers.start(home)
    warm = submit(spool, craftsman="echo")
    wait_outcomes(spool, [warm])
    holder = sqlite3.connect(ledger_path, timeout=10)  # the worker may be writing the warm-up's record
    holder.execute("BEGIN EXCLUSIVE")  # held for 5 s: more than two of the ledger's busy timeouts
    locked_at = time.monotonic()
    try:
        ids = []
        while time.monotonic() - locked_at < 2.5 * ledger.BUSY_TIMEOUT_MS / 1000:
            batch = [submit(spool, craftsman="echo", content=f"t{len(ids) + i}") for i in range(5)]
            outcomes = wait_outcomes(spool, batch, timeout=30)
            assert all(o["status"] == "completed" for o in outcomes.values())
            ids += batch
            threading.Event().wait(0.5)  # pacing: waves of tasks while it is held
    finally:
        holder.rollback()
        holder.close()
    deadline = time.monotonic() + 30
    conn = sqlite3.connect(ledger_path, timeout=5)
    placeholders = ",".join("?" * len(ids))
    while conn.execute(f"SELECT COUNT(*) FROM tasks WHERE id IN ({placeholders})",
                       ids).fetchone()[0] < len(ids):
        assert time.monotonic() < deadline, "ledger records did not follow"
        threading.Event().wait(0.1)


def test_resubmitting_an_id_runs_it_once(home: Path, spool: Spool, fake_openai: FakeOpenAI,
                                         workers: Workers) -> None:
    workers.start(home)
    for _ in range(3):
        submit(spool, id="nightly-report", content="same")
    wait_outcomes(spool, ["nightly-report"])
    submit(spool, id="nightly-report", content="same")
    marker = submit(spool, content="marker")
    wait_outcomes(spool, [marker])
    assert [b["messages"][-1]["content"] for b in fake_openai.completions()].count("same") == 1


@pytest.mark.slow
def test_four_workers_two_thousand_tasks_each_completed_exactly_once(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, spool={"fsync": False}, craftsmen={
        "local": {"backend": "openai", "base_url": fake_openai.base_url, "model": "fake-model",
                  "max_concurrent": 64, "retries": 0}})
    for _ in range(4):  # 8 each, 64 slots: no worker can hold every slot, so all four race
        workers.start(home, "--concurrency", "8")
    ids = [task_format.validate({"content": f"task {i}"}) for i in range(2000)]
    for start in range(0, 2000, 250):  # submitted while the workers run
        spool.submit(ids[start:start + 250])
    outcomes = wait_outcomes(spool, [t.id for t in ids], timeout=240)
    assert all(o["status"] == "completed" for o in outcomes.values())
    contents = [b["messages"][-1]["content"] for b in fake_openai.completions()]
    assert len(contents) == 2000 and len(set(contents)) == 2000
    workers.terminate_all()  # a publish ends with an unlink just after its outcome appears
    assert os.listdir(spool.pending) == [] and os.listdir(spool.in_progress) == []
    assert len(os.listdir(spool.completed)) == 2000
    served = {o["result"]["worker_id"] for o in outcomes.values()}
    assert len(served) > 1


@pytest.mark.parametrize("max_concurrent, concurrency, expected", [(2, 16, 2), (8, 3, 3)])
def test_in_flight_requests_are_capped_per_craftsman_and_per_process(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        max_concurrent: int, concurrency: int, expected: int) -> None:
    write_config(home, fake_openai.base_url, craftsmen={
        "local": {"backend": "openai", "base_url": fake_openai.base_url, "model": "fake-model",
                  "max_concurrent": max_concurrent, "retries": 0}})
    fake_openai.latency_s = 0.3
    ids = [submit(spool, content=f"t{i}") for i in range(10)]
    workers.start(home, "--concurrency", str(concurrency))
    wait_outcomes(spool, ids)
    assert fake_openai.max_in_flight == expected


def test_a_busy_craftsman_does_not_block_another_craftsmans_tasks(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, craftsmen={
        "local": {"backend": "openai", "base_url": fake_openai.base_url, "model": "fake-model",
                  "max_concurrent": 1, "retries": 0}})
    fake_openai.latency_s = 5  # margins for a loaded machine: the test ends with the quick one
    slow = [submit(spool, content=f"slow {i}", priority=10) for i in range(3)]
    workers.start(home)
    assert fake_openai.request_seen.wait(10)
    quick = submit(spool, craftsman="echo", content="quick", priority=1)
    outcome = wait_outcomes(spool, [quick], timeout=4)[quick]
    assert outcome["status"] == "completed"
    assert not (spool.completed / f"{slow[0]}.json").exists()  # it ran beside the first


@contextlib.contextmanager
def inotify_queue_of(size: int) -> Iterator[int]:
    """New inotify instances get a queue of `size` events while this lasts (root may set it),
    so an overflow takes hundreds of tasks, not the default 16,384; the size they get."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    before = knob.read_text()
    try:
        knob.write_text(str(size))
    except OSError:  # not root: the queue keeps the system's size
        yield int(before)
        return
    try:
        yield size
    finally:
        knob.write_text(before)


def test_an_inotify_queue_overflow_is_followed_by_a_rescan_that_loses_nothing(
        home: Path, spool: Spool, workers: Workers) -> None:
    write_config(home, spool={"fsync": False})
    with inotify_queue_of(256) as limit:  # taken at inotify_init: the worker keeps it
        proc = workers.start(home)
        wait_ready(spool)
    proc.send_signal(signal.SIGSTOP)  # it cannot read events while more than the queue holds arrive
    try:
        batch = [task_format.validate({"content": f"t{i}", "craftsman": "echo"})
                 for i in range(limit + 500)]
        spool.submit(batch)
    finally:
        proc.send_signal(signal.SIGCONT)
    wait_outcomes(spool, [t.id for t in batch], timeout=180)
    assert "overflowed" in log_of(proc)
    assert os.listdir(spool.pending) == []


def test_heartbeats_reach_the_ledger(home: Path, spool: Spool, workers: Workers) -> None:
    proc = workers.start(home)
    task_id = submit(spool, craftsman="echo")
    wait_outcomes(spool, [task_id])
    wait_worker_row(home)
    deadline = time.monotonic() + 10
    conn = sqlite3.connect(home / "db" / "koubou.db")
    first = conn.execute("SELECT heartbeat_at FROM workers").fetchone()[0]
    # The outcome is in completed/ once renamed, its count once its group's fsync is done: on
    # a loaded machine a heartbeat can fall between the two, so the one looked for counts it.
    while (row := conn.execute("SELECT heartbeat_at, pid, state, done FROM workers").fetchone()
           )[0] == first or row[3] == 0:
        assert time.monotonic() < deadline, "no heartbeat counting the task within 10 s " \
            "(heartbeat_s is 1)"
        threading.Event().wait(0.2)
    assert row[1:] == (proc.pid, "running", 1)


def test_a_queued_file_rewritten_before_its_claim_runs_with_its_new_content(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.latency_s = 0.5
    workers.start(home, "--concurrency", "1")
    first = submit(spool, content="first", priority=10)
    assert fake_openai.request_seen.wait(10)
    second = submit(spool, content="old text")  # queued behind the first, parsed already
    (spool.pending / f"{second}.json").write_text(
        json.dumps({"id": second, "content": "new text"}))  # rewritten in place
    wait_outcomes(spool, [first, second])
    assert fake_openai.completions()[-1]["messages"][-1]["content"] == "new text"


def test_two_files_with_one_id_run_once_and_the_duplicate_is_refused(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers,
        tmp_path: Path) -> None:
    fake_openai.latency_s = 0.5  # both are claimed and running at once
    workers.start(home)
    wait_ready(spool)
    stage = tmp_path / "stage"
    stage.mkdir()
    for name in ("first.json", "second.json"):
        (stage / name).write_text(json.dumps({"id": "dup", "content": name}))
    for name in ("first.json", "second.json"):
        os.rename(stage / name, spool.pending / name)
    outcome = wait_outcomes(spool, ["dup"])["dup"]
    sidecars = ("first.json.error.json", "second.json.error.json")
    deadline = time.monotonic() + 10
    # Once the other claim has left in_progress/ and its reason is written, nothing more comes.
    while os.listdir(spool.in_progress) or not any((spool.failed / n).exists() for n in sidecars):
        assert time.monotonic() < deadline, "the second claim was never refused"
        threading.Event().wait(0.05)
    refused = {n for n in sidecars if (spool.failed / n).exists()}
    assert len(refused) == 1, "the second outcome was written over the first"
    reason = read_json(spool.failed / refused.pop())["error"]["message"]
    assert "an outcome for id dup already exists" in reason
    (stage / "third.json").write_text(json.dumps({"id": "dup", "content": "third.json"}))
    os.rename(stage / "third.json", spool.pending / "third.json")  # after it finished
    wait_file(spool.failed, "third.json.error.json")
    assert read_json(spool.completed / "dup.json") == outcome
    sent = [b["messages"][-1]["content"] for b in fake_openai.completions()]
    assert "third.json" not in sent  # refused when judged: no call made
