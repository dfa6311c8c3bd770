"""Waiting on a task that no live worker serves is said at once on stderr, then the wait goes on
(`koubou-submit --wait`, `koubou wait`, MCP `delegate_task` with wait_s)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
from click.testing import CliRunner

from conftest import Workers, submit as queue, wait_outcomes, wait_ready
from koubou_spool import config as config_module
from koubou_spool.cli.koubou import cli
from koubou_spool.cli.submit import submit
from koubou_spool.service.workshop import Workshop
from koubou_spool.observe import status
from koubou_spool.service import serving
from koubou_spool.spool import task as task_format
from koubou_spool.spool.files import Spool

REPO = Path(__file__).resolve().parent.parent


def run_submit(*args: str):
    return CliRunner().invoke(submit, list(args), prog_name="koubou-submit")


def test_submit_wait_says_at_once_that_no_worker_runs(home: Path) -> None:
    result = run_submit("hello", "--id", "lonely", "--wait", "--timeout", "0.3")
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert lines[1] == (f"koubou-submit: no worker is running in {home}; task lonely waits in "
                        "the queue until one starts (`koubou worker`)")
    assert "timed out" in lines[-1]


def test_a_craftsman_no_live_worker_serves_is_named_and_the_wait_goes_on(
        home: Path, spool: Spool, workers: Workers) -> None:
    workers.start(home, "--craftsman", "echo")
    wait_ready(spool)
    served = run_submit("hi", "--craftsman", "echo", "--wait", "--timeout", "30")
    assert served.exit_code == 0 and "no live worker" not in served.stderr
    assert served.stdout == "hi\n"

    result = run_submit("for the fake", "--id", "for-local", "--wait", "--timeout", "0.3")
    assert result.exit_code == 3
    assert ("koubou-submit: no live worker serves craftsman local; task for-local waits until "
            "one does (`koubou worker --craftsman local`, or `koubou worker` for all)"
            ) in result.stderr.splitlines()

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH")]))}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "koubou_spool.cli.koubou", "wait", "for-local", "--timeout", "60"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reaper = threading.Timer(60, waiting.kill)
    reaper.start()
    try:
        first = waiting.stderr.readline()  # said at once, before any worker could change it
        assert first.startswith("koubou: no live worker serves craftsman local; task for-local")
        assert waiting.poll() is None  # and still waiting
        workers.start(home)  # every craftsman: the wait ends with the outcome
        out, err = waiting.communicate(timeout=60)
    finally:
        reaper.cancel()
        waiting.kill()
        waiting.wait()
    assert waiting.returncode == 0, err
    assert out == "for-local: completed\n"


def test_koubou_wait_is_silent_when_the_task_is_finished_or_held(home: Path, spool: Spool,
                                                                  workers: Workers) -> None:
    workers.start(home)
    wait_ready(spool)
    done = queue(spool, craftsman="echo")
    wait_outcomes(spool, [done])
    result = CliRunner().invoke(cli, ["wait", done], prog_name="koubou")
    assert result.exit_code == 0 and result.stderr == ""
    assert status.unfinished_tasks(spool, [done, "no-such-task"]) == []


def test_mcp_delegate_says_it_in_the_reply(home: Path, spool: Spool) -> None:
    workshop = Workshop(home, home / "config" / "koubou.yaml")
    waited = anyio.run(workshop.delegate, {"content": "hello", "id": "via-mcp"}, 0.2)
    assert waited["state"] == "pending"
    assert waited["warning"] == (f"no worker is running in {home}; task via-mcp waits in the "
                                 "queue until one starts (`koubou worker`)")
    at_once = anyio.run(workshop.delegate, {"content": "hello", "id": "no-wait"}, 0)
    assert "warning" not in at_once


def test_destinations_count_what_attached_files_and_the_budget_could_change(home: Path) -> None:
    config = config_module.parse({
        "craftsmen": {"box": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                              "model": "m", "local": True},
                      "cloud": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                                "model": "m"}},
        "routing": {"rules": [{"then": "cloud"}]}})
    plain = task_format.validate({"content": "hello"})
    attached = task_format.validate({"content": "hello", "files": ["/etc/hostname"]})
    assert serving.destinations(plain, config) == ["cloud"]
    assert serving.destinations(attached, config) == ["cloud", "box"]
    budgeted = config_module.parse({"craftsmen": {"cloud": {
        "backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}},
        "budget": {"daily_usd": 1, "when_exhausted": "fail"}})
    assert serving.destinations(plain, budgeted) == ["cloud", None]
