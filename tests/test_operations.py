"""Operations under real processes and signals: leases, kill -9, cancel, retry, scheduling,
dependencies, hooks and the systemd notify protocol (README: How it keeps its promises; Operations)."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import (Workers, log_of, read_json, submit, wait_log, wait_outcomes, wait_ready,
                      write_config)
from fake_openai import FakeOpenAI
from koubou_spool.spool import task as task_format
from koubou_spool.cli.koubou import cli
from koubou_spool.spool.files import Spool
from koubou_spool.spool.watcher import wait_for_files


def test_cancel_of_a_running_task_aborts_its_request(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    fake_openai.latency_s = 30
    proc = workers.start(home)
    task_id = submit(spool, content="long job")
    assert fake_openai.request_seen.wait(10)
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["cancel", task_id])
    assert result.exit_code == 0, result.output
    assert fake_openai.request_aborted.wait(10), "the request was not aborted"
    assert time.monotonic() - started < 10
    outcome = spool.outcome(task_id)
    assert outcome["error"]["kind"] == "cancelled" and outcome["error"]["attempts"] == 1
    assert not (spool.completed / f"{task_id}.json").exists()
    wait_log(proc, "revoked")
    marker = submit(spool, content="after cancel", craftsman="echo")
    wait_outcomes(spool, [marker])
    assert not [n for n in os.listdir(spool.in_progress) if n.startswith(task_id)]
    assert proc.poll() is None


def test_cancel_pending_and_retry_failed(home: Path, spool: Spool, fake_openai: FakeOpenAI,
                                         workers: Workers) -> None:
    runner = CliRunner()
    pending = submit(spool, content="not yet")
    assert runner.invoke(cli, ["cancel", pending]).exit_code == 0
    assert spool.outcome(pending)["error"]["kind"] == "cancelled"
    again = runner.invoke(cli, ["cancel", pending])
    assert again.exit_code == 1 and "nothing to cancel" in again.stderr
    assert runner.invoke(cli, ["retry", pending]).exit_code == 0
    stored = read_json(spool.pending / f"{pending}.json")
    assert "error" not in stored and "status" not in stored
    workers.start(home)
    assert wait_outcomes(spool, [pending])[pending]["status"] == "completed"
    assert runner.invoke(cli, ["retry", pending]).exit_code == 2  # only failed tasks


def test_retry_puts_rejected_input_back_as_it_was(home: Path, spool: Spool) -> None:
    (spool.pending / "notes.json").write_bytes(b'{"content": 7}')  # no valid task
    assert spool.reject(spool.pending, "notes.json", "content: not a string") == "notes.json"
    result = CliRunner().invoke(cli, ["retry", "notes.json"])
    assert result.exit_code == 0, result.output
    assert (spool.pending / "notes.json").read_bytes() == b'{"content": 7}'
    assert os.listdir(spool.failed) == []  # the reason went with it


def test_a_stopped_worker_past_its_lease_cannot_complete_its_task(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, spool={"heartbeat_s": 0.5, "lease_s": 2})
    fake_openai.latency_s = 4
    sleeper = workers.start(home)
    task_id = submit(spool, content="lease test")
    assert fake_openai.request_seen.wait(10)
    sleeper.send_signal(signal.SIGSTOP)  # alive, holding its lock, but no heartbeats
    try:
        fake_openai.latency_s = 0
        workers.start(home)  # takes the claim over once the lease has run out
        outcome = wait_outcomes(spool, [task_id], timeout=30)[task_id]
    finally:
        sleeper.send_signal(signal.SIGCONT)
    assert outcome["status"] == "completed" and outcome["result"]["attempts"] == 2
    assert outcome["result"]["worker_id"] not in Path(sleeper.log_path).read_text()
    marker = submit(spool, content="marker", craftsman="echo")
    wait_outcomes(spool, [marker])
    # The woken worker's request came back after the takeover: fenced, nothing published twice.
    assert read_json(spool.completed / f"{task_id}.json")["result"]["attempts"] == 2
    assert sleeper.poll() is None


@pytest.mark.slow
def test_kill_9_every_1_5_s_while_three_workers_run_300_tasks(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    write_config(home, fake_openai.base_url, spool={"heartbeat_s": 0.5, "lease_s": 5,
                                                    "max_attempts": 10},
                 craftsmen={"local": {"backend": "openai", "base_url": fake_openai.base_url,
                                      "model": "fake-model", "max_concurrent": 12,
                                      "retries": 0}})
    # 300 tasks x 0.4 s over at most 12 in flight take 10 s or more on any machine, so the loop
    # below kills several workers however fast the machine is; at most 8, since each restart
    # costs a second of CPU (the openai import), and on a loaded machine more kills made the
    # run longer, which made more kills (up to 20, 25 CPU-s).
    fake_openai.latency_s = 0.4
    running = [workers.start(home, "--concurrency", "4") for _ in range(3)]
    tasks = [task_format.validate({"content": f"task {i}"}) for i in range(300)]
    spool.submit(tasks)
    names = {f"{t.id}.json" for t in tasks}
    rng = random.Random(7)
    kills = 0
    deadline = time.monotonic() + 240
    while wait_for_files([spool.completed, spool.failed], names,
                         1.5 if kills < 8 else deadline - time.monotonic()) != names:
        assert time.monotonic() < deadline, "tasks did not finish"
        victim = running.pop(rng.randrange(len(running)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        kills += 1
        running.append(workers.start(home, "--concurrency", "4"))
    outcomes = {t.id: spool.outcome(t.id) for t in tasks}
    assert all(o["status"] == "completed" for o in outcomes.values())
    assert len(os.listdir(spool.completed)) == 300  # each task has exactly one outcome
    assert os.listdir(spool.pending) == []
    assert kills >= 2
    # the killed workers' claims were taken over with their attempts counted
    retried = [o for o in outcomes.values() if o["result"]["attempts"] > 1]
    conn = sqlite3.connect(home / "db" / "koubou.db", timeout=10)
    lost = conn.execute("SELECT COUNT(*) FROM attempts WHERE outcome = 'lost'").fetchone()[0]
    assert lost >= len(retried) > 0


def test_not_before_holds_a_task_then_a_timer_wakes_the_worker(
        home: Path, spool: Spool, workers: Workers) -> None:
    workers.start(home)
    wait_ready(spool)
    start = task_format.iso(time.time() + 1.5)
    task_id = submit(spool, craftsman="echo", not_before=start)
    assert wait_for_files([spool.completed], {f"{task_id}.json"}, 1.0) == set()
    outcome = wait_outcomes(spool, [task_id])[task_id]
    assert task_format.parse_iso(outcome["result"]["started_at"]) >= task_format.parse_iso(start)


def test_expired_tasks_fail_as_expired(home: Path, spool: Spool, workers: Workers) -> None:
    task_id = submit(spool, craftsman="echo", expires_at=task_format.iso(time.time() - 1))
    workers.start(home)
    assert wait_outcomes(spool, [task_id])[task_id]["error"]["kind"] == "expired"


def test_after_waits_for_dependencies_and_fails_with_theirs(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    workers.start(home)
    child = submit(spool, craftsman="echo", content="second", after=["first"])
    orphan = submit(spool, craftsman="echo", content="never", after=["doomed"])
    wait_ready(spool)
    assert os.path.exists(spool.pending / f"{child}.json")
    fake_openai.reject_next = 1
    submit(spool, id="doomed", content="fails")
    submit(spool, id="first", craftsman="echo", content="first")
    outcomes = wait_outcomes(spool, [child, orphan, "first", "doomed"])
    assert outcomes[child]["status"] == "completed"
    assert task_format.parse_iso(outcomes[child]["result"]["started_at"]) >= \
        task_format.parse_iso(outcomes["first"]["result"]["finished_at"])
    assert outcomes[orphan]["error"]["kind"] == "dependency"
    assert "doomed" in outcomes[orphan]["error"]["message"]


def test_on_finish_hook_runs_with_the_outcome_and_its_failure_is_not_fatal(
        home: Path, spool: Spool, workers: Workers, tmp_path: Path) -> None:
    record = tmp_path / "hook.txt"
    script = (f"import os; open({str(record)!r}, 'a').write(' '.join(["
              "os.environ['KOUBOU_TASK_ID'], os.environ['KOUBOU_STATUS'], "
              "os.environ['KOUBOU_OUTCOME_FILE']]) + '\\n'); raise SystemExit(3)")
    write_config(home, hooks={"on_finish": [sys.executable, "-c", script]})
    proc = workers.start(home)
    first = submit(spool, craftsman="echo")
    second = submit(spool, craftsman="echo")
    wait_outcomes(spool, [first, second])
    deadline = time.monotonic() + 10
    # The hook writes its line before it exits, and the worker logs the exit after: wait for both.
    while (len(record.read_text().splitlines() if record.exists() else []) < 2
           or log_of(proc).count("exited with status 3") < 2):
        assert time.monotonic() < deadline, "the hook did not run and fail twice"
        threading.Event().wait(0.05)
    lines = sorted(record.read_text().splitlines())
    assert lines == sorted(f"{i} completed {spool.completed / (i + '.json')}"
                           for i in (first, second))
    while "exited with status 3" not in log_of(proc):  # logged once the worker reaps it
        assert time.monotonic() < deadline, "the hook's failure was not logged"
        threading.Event().wait(0.05)
    assert proc.poll() is None


def test_systemd_notify_ready_watchdog_and_status(home: Path, tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "koubou_spool.cli.koubou", "worker", "--home", str(home)],
        env=env, stderr=subprocess.DEVNULL)
    try:
        messages = [sock.recv(4096).decode() for _ in range(3)]
        assert messages[0].startswith("READY=1\nSTATUS=serving")
        assert all(m.startswith("WATCHDOG=1") for m in messages[1:])
        proc.send_signal(signal.SIGTERM)
        while not (message := sock.recv(4096).decode()).startswith("STOPPING=1"):
            assert message.startswith("WATCHDOG=1")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        sock.close()


def _heartbeats_while(home: Path, recovery: object, monkeypatch: pytest.MonkeyPatch,
                      seconds: float) -> tuple[list[int], list[str]]:
    """Run a worker in this process with `recovery` in place of recover_orphans; the lock
    file's mtimes seen over `seconds`, and the tasks completed meanwhile."""
    from koubou_spool import config as config_module
    from koubou_spool.work import worker as worker_module
    monkeypatch.setattr(worker_module, "recover_orphans", recovery)
    write_config(home, spool={"heartbeat_s": 0.2, "lease_s": 10})
    config = config_module.load(home / "config" / "koubou.yaml")
    spool = Spool.open(home)

    async def scenario() -> tuple[list[int], list[str]]:
        worker = worker_module.Worker(home, config, craftsmen=["echo"])
        running = asyncio.ensure_future(worker.run())
        lock = spool.workers / f"{worker.id}.lock"
        mtimes: list[int] = []
        started = time.monotonic()
        while time.monotonic() - started < seconds and not running.done():
            if lock.exists():
                mtimes.append(lock.stat().st_mtime_ns)
            await asyncio.sleep(0.05)
        task_id = submit(spool, craftsman="echo", content="still served")
        for _ in range(100):
            if running.done() or (spool.completed / f"{task_id}.json").exists():
                break
            await asyncio.sleep(0.05)
        done = [task_id] if (spool.completed / f"{task_id}.json").exists() else []
        worker.stop()
        await asyncio.wait_for(running, 20)
        return sorted(set(mtimes)), done

    return asyncio.run(scenario())


def test_a_failing_recovery_does_not_stop_the_heartbeat(
        home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def no_space(*args: object, **kwargs: object) -> list:
        calls.append(time.monotonic())
        raise OSError(errno.ENOSPC, "No space left on device")

    mtimes, done = _heartbeats_while(home, no_space, monkeypatch, 1.5)
    assert len(mtimes) >= 4, "the heartbeat stopped"
    assert len(calls) >= 3 and done
    assert "No space left on device" in caplog.text


def test_a_slow_recovery_does_not_block_the_loop(
        home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(*args: object, **kwargs: object) -> list:
        time.sleep(2)  # a locked ledger: up to seconds per orphan
        return []

    mtimes, done = _heartbeats_while(home, slow, monkeypatch, 1.5)
    assert len(mtimes) >= 4, "the loop was blocked by recovery"
    assert done
