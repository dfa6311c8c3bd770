"""The command line: exit codes, --json, error messages, and the installed console scripts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import click
from click.testing import CliRunner

from conftest import Workers, submit
from fake_openai import FakeOpenAI
from koubou_spool.cli.koubou import cli
from koubou_spool.cli.submit import submit as submit_command
from koubou_spool.spool.files import Spool


def run(command, *args: str, input: str | None = None):
    return CliRunner().invoke(command, list(args), input=input)


def test_init_is_idempotent_and_never_overwrites_the_config(isolated_env: Path) -> None:
    first = run(cli, "init")
    assert first.exit_code == 0 and first.stdout.strip() == str(isolated_env)
    config = isolated_env / "config" / "koubou.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert oct((isolated_env / "config").stat().st_mode & 0o777) == "0o700"
    config.write_text("craftsmen: {echo: {backend: echo}}\n")
    assert run(cli, "init").exit_code == 0
    assert config.read_text() == "craftsmen: {echo: {backend: echo}}\n"
    for state in ("tmp", "pending", "in_progress", "completed", "failed"):
        assert (isolated_env / "tasks" / state).is_dir()
    assert (isolated_env / "db" / "koubou.db").exists()


def test_home_and_config_are_accepted_after_the_subcommand(tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    assert run(cli, "init", "--home", str(other)).exit_code == 0
    info = json.loads(run(cli, "info", "--home", str(other), "--json").stdout)
    assert info["home"] == str(other) and "echo" in info["craftsmen"]
    info = json.loads(run(cli, "--home", str(other), "info", "--json").stdout)
    assert info["home"] == str(other)


def test_commands_on_a_missing_home_exit_4_with_the_fix(isolated_env: Path) -> None:
    result = run(cli, "status")
    assert result.exit_code == 4
    assert "koubou init" in result.stderr and "Traceback" not in result.output


def test_submit_prints_the_id_and_rejects_bad_input_with_exit_2(home: Path) -> None:
    ok = run(submit_command, "--craftsman", "echo", "--priority", "9", "--id", "job-1",
             "--context", '{"repo": "x"}', "hello")
    assert ok.exit_code == 0 and ok.stdout.strip() == "job-1"
    stored = json.loads((home / "tasks" / "pending" / "job-1.json").read_text())
    assert stored["priority"] == 9 and stored["context"] == {"repo": "x"}
    again = run(submit_command, "--id", "job-1", "--json", "other")
    assert again.exit_code == 0
    assert json.loads(again.stdout) == {"id": "job-1", "state": "pending", "new": False}
    bad = run(submit_command, "--id", "../x", "hello")
    assert bad.exit_code == 2 and "id: expected" in bad.stderr
    assert run(submit_command).exit_code == 2
    assert run(submit_command, "--context", "[1]", "x").exit_code == 2
    assert run(submit_command, "--priority", "11", "x").exit_code == 2
    unknown = run(submit_command, "--craftsman", "nobody", "x")
    assert unknown.exit_code == 2 and "no craftsman named 'nobody'" in unknown.stderr


def test_submit_from_stdin_and_from_a_task_file(home: Path, tmp_path: Path) -> None:
    from_stdin = run(submit_command, "-", input="text on stdin\n")
    assert from_stdin.exit_code == 0
    task_id = from_stdin.stdout.strip()
    assert json.loads((home / "tasks" / "pending" / f"{task_id}.json").read_text())[
        "content"] == "text on stdin\n"
    task_file = tmp_path / "t.json"
    task_file.write_text(json.dumps({"content": "from file", "type": "analysis"}))
    result = run(submit_command, "--file", str(task_file), "--priority", "2")
    stored = json.loads((home / "tasks" / "pending" / f"{result.stdout.strip()}.json").read_text())
    assert stored["type"] == "analysis" and stored["priority"] == 2


def test_batch_is_all_or_nothing_and_accepts_openai_batch_lines(home: Path,
                                                                tmp_path: Path) -> None:
    batch = tmp_path / "in.jsonl"
    lines = [{"content": "plain task", "id": "a"},
             {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}]
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = run(submit_command, "--batch", str(batch))
    assert result.exit_code == 0 and result.stdout.split() == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "fine", "id": "c"}\n{"content": 5}\nnot json\n')
    result = run(submit_command, "--batch", str(bad))
    assert result.exit_code == 2
    assert "line 2: content" in result.stderr and "line 3: not valid JSON" in result.stderr
    assert not (home / "tasks" / "pending" / "c.json").exists()
    # task options are the file's to give: before, --repo was dropped and the line queued
    result = run(submit_command, "--batch", str(batch), "--repo", str(tmp_path), "--priority", "9")
    assert result.exit_code == 2 and "drop --priority, --repo" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_list_result_and_wait(home: Path, spool: Spool, workers: Workers) -> None:
    overview = json.loads(run(cli, "status", "--json").stdout)
    assert overview["queues"]["pending"] == 0 and overview["budget"] == {"enabled": False}
    assert "budget       none configured" in run(cli, "status").stdout
    queued = submit(spool, craftsman="echo", content="hello")
    status = json.loads(run(cli, "status", queued, "--json").stdout)
    assert status["state"] == "pending" and status["id"] == queued
    assert run(cli, "result", queued).exit_code == 3
    workers.start(home)
    waited = run(cli, "wait", queued, "--timeout", "30")
    assert waited.exit_code == 0 and f"{queued}: completed" in waited.stdout
    result = run(cli, "result", queued)
    assert result.exit_code == 0 and result.stdout == "hello\n"
    # The attempt's ledger row is written behind the outcome, by the worker's ledger thread:
    # its start first, its end in a later commit.
    deadline = time.monotonic() + 10
    while True:
        status = json.loads(run(cli, "status", queued, "--json").stdout)
        if any(attempt["outcome"] for attempt in status["attempts"]):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    assert status["state"] == "completed" and status["attempts"][0]["outcome"] == "completed"
    listed = json.loads(run(cli, "list", "--json", "--state", "completed").stdout)
    assert [item["id"] for item in listed] == [queued]
    assert run(cli, "status", "no-such-task").exit_code == 2


def test_list_shows_the_newest_first_up_to_its_limit(home: Path, spool: Spool) -> None:
    ids = [submit(spool, craftsman="echo", content=f"t{i}") for i in range(5)]
    for age, task_id in enumerate(reversed(ids)):  # the last submitted is the newest
        os.utime(spool.pending / f"{task_id}.json", (1_700_000_000 - age, 1_700_000_000 - age))
    listed = json.loads(run(cli, "list", "--json", "--limit", "2").stdout)
    assert [item["id"] for item in listed] == [ids[4], ids[3]]
    assert len(json.loads(run(cli, "list", "--json").stdout)) == 5  # default limit 20
    assert run(cli, "list", "--limit", "0").exit_code == 2


def test_a_failed_task_exits_1_and_an_expired_wait_exits_3(
        home: Path, spool: Spool, fake_openai: FakeOpenAI, workers: Workers) -> None:
    never = submit(spool, craftsman="echo", id="later")
    timed_out = run(cli, "wait", never, "--timeout", "0.2")
    assert timed_out.exit_code == 3 and "still queued: later" in timed_out.stderr
    fake_openai.reject_next = 1
    workers.start(home)
    doomed = submit(spool, content="too long")
    result = run(cli, "wait", doomed, "--timeout", "30")
    assert result.exit_code == 1 and "failed (backend" in result.stdout
    failed = run(cli, "result", doomed)
    assert failed.exit_code == 1 and "failed (backend)" in failed.stderr


def test_every_command_has_help() -> None:
    for name in ("init", "info", "worker", "status", "list", "result", "wait"):
        result = run(cli, name, "--help")
        assert result.exit_code == 0 and "--home" in result.stdout, name
    assert "--wait" in run(submit_command, "--help").stdout


def test_newcomer_path_through_the_installed_console_scripts(tmp_path: Path) -> None:
    """The README's quickstart: init, a worker, koubou-submit --wait, result, status."""
    assert shutil.which("koubou") and shutil.which("koubou-submit"), "pip install -e . first"
    env = dict(os.environ, KOUBOU_HOME=str(tmp_path / "newcomer"))
    quickstart = Path(__file__).parent.parent / "bin" / "koubou-quickstart"
    result = subprocess.run([str(quickstart)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Hello from the koubou quickstart" in result.stdout
    assert "completed" in result.stdout
    worker = subprocess.Popen(["koubou", "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        waited = subprocess.run(["koubou-submit", "--craftsman", "echo", "--wait",
                                 "--timeout", "30", "second task"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert waited.returncode == 0 and waited.stdout == "second task\n"
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0


def test_koubou_drop_copies_whole_files_into_pending(home: Path, tmp_path: Path) -> None:
    task_file = tmp_path / "job-9.json"
    task_file.write_text('{"content": "dropped"}')
    drop = Path(__file__).parent.parent / "bin" / "koubou-drop"
    env = dict(os.environ, KOUBOU_HOME=str(home))
    first = subprocess.run([str(drop), str(task_file)], env=env, capture_output=True, text=True)
    assert first.returncode == 0 and first.stdout.strip() == "job-9.json"
    assert (home / "tasks" / "pending" / "job-9.json").read_text() == '{"content": "dropped"}'
    again = subprocess.run([str(drop), str(task_file)], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "already queued" in again.stderr
    assert [n for n in os.listdir(home / "tasks" / "tmp")] == []


def test_every_command_is_in_the_readme() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    context = click.Context(cli)
    for name in cli.list_commands(context):
        command = cli.get_command(context, name)
        assert f"koubou {name}" in readme, f"koubou {name} is not documented in README.md"
        for sub in getattr(command, "commands", {}):
            assert f"koubou {name} {sub}" in readme, f"koubou {name} {sub} is not in README.md"
    for option in ("--batch", "--wait", "--output", "--attach", "--id"):
        assert option in readme
