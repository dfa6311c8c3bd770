"""`koubou doctor`: endpoints up and down, model ids, keys, permissions, ledger, inotify."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import write_config
from fake_openai import FakeOpenAI
from koubou_spool.ops import doctor
from koubou_spool.spool import ledger
from koubou_spool.cli.koubou import cli


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a busy llama-cpp-python)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def run_doctor(*args: str) -> Result:
    return CliRunner().invoke(cli, ["doctor", *args])


def craftsman(base_url: str, model: str = "fake-model", **extra: object) -> dict:
    return {"backend": "openai", "base_url": base_url, "model": model, "local": True, **extra}


def test_all_up_exits_zero(home: Path, fake_openai: FakeOpenAI) -> None:
    write_config(home, fake_openai.base_url, craftsmen={
        "local": craftsman(fake_openai.base_url), "echo": {"backend": "echo"},
        "agent": {"backend": "command", "argv": [sys.executable, "-c", "pass"]},
        "on_path": {"backend": "command", "argv": ["true"]}})
    ledger.open_ledger(home / "db" / "koubou.db").close()
    result = run_doctor()
    assert result.exit_code == 0, result.output
    assert "ok       craftsman local" in result.stdout


def test_one_endpoint_down_exits_4_naming_it(home: Path, fake_openai: FakeOpenAI) -> None:
    down = f"http://127.0.0.1:{closed_port()}/v1"
    write_config(home, fake_openai.base_url, craftsmen={
        "local": craftsman(fake_openai.base_url), "backup": craftsman(down)})
    koubou = shutil.which("koubou")
    assert koubou, "the koubou console script is not installed (pip install -e .)"
    proc = subprocess.run([koubou, "doctor", "--home", str(home)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 4
    assert "ok       craftsman local" in proc.stdout
    assert f"craftsman backup: cannot reach {down}/models" in proc.stdout
    assert "broken craftsmen: backup" in proc.stderr


def test_a_missing_model_id_is_named_with_what_the_server_lists(
        home: Path, fake_openai: FakeOpenAI) -> None:
    write_config(home, fake_openai.base_url, craftsmen={
        "local": craftsman(fake_openai.base_url, model="gpt-oss-20b")})
    result = run_doctor()
    assert result.exit_code == 4
    assert "model 'gpt-oss-20b' is not among the models" in result.stdout
    assert "(fake-model)" in result.stdout
    assert "broken craftsmen: local" in result.stderr


def test_a_silent_endpoint_times_out_and_says_why(home: Path, silent_port: int) -> None:
    write_config(home, craftsmen={"slow": craftsman(f"http://127.0.0.1:{silent_port}/v1")})
    result = run_doctor("--timeout", "0.5")
    assert result.exit_code == 4
    assert "did not answer within 0.5 s" in result.stdout
    assert "llama-cpp-python" in result.stdout


def test_a_world_readable_config_naming_a_key_warns(
        home: Path, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOUBOU_TEST_KEY", "sk-test-123")
    path = write_config(home, fake_openai.base_url, craftsmen={
        "cloud": craftsman(fake_openai.base_url, api_key_env="KOUBOU_TEST_KEY")})
    os.chmod(path, 0o644)
    os.chmod(path.parent, 0o755)
    result = run_doctor("--json")
    assert result.exit_code == 0  # warnings do not fail without --strict
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["config"]["status"] == "warning"
    messages = " ".join(p["message"] for p in checks["config"]["problems"])
    assert f"chmod 600 {path}" in messages and f"chmod 700 {path.parent}" in messages
    assert checks["craftsman cloud"]["status"] == "ok"
    assert "sk-test-123" not in result.output
    assert run_doctor("--strict").exit_code == 4
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o700)
    assert json.loads(run_doctor("--json").stdout)["checks"][1]["status"] == "ok"


def test_an_unset_api_key_and_a_missing_program_are_errors(
        home: Path, fake_openai: FakeOpenAI) -> None:
    write_config(home, fake_openai.base_url, craftsmen={
        "cloud": craftsman(fake_openai.base_url, api_key_env="KOUBOU_UNSET_KEY"),
        "agent": {"backend": "command", "argv": ["no-such-agent-xyz", "-p"]}})
    result = run_doctor()
    assert result.exit_code == 4
    assert "environment variable KOUBOU_UNSET_KEY is not set" in result.stdout
    assert "no-such-agent-xyz is not on PATH" in result.stdout
    assert "broken craftsmen: cloud, agent" in result.stderr


def test_a_broken_config_and_a_missing_home(isolated_env: Path) -> None:
    result = run_doctor()
    assert result.exit_code == 4
    assert f"the home {isolated_env} does not exist; run `koubou init" in result.stdout


def test_a_damaged_ledger_is_an_error(home: Path) -> None:
    (home / "db" / "koubou.db").write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    problems = doctor.check_ledger(home / "db" / "koubou.db")
    assert problems and problems[0].level == "error"
    assert "koubou ledger rebuild" in problems[0].message


def test_low_inotify_limits_warn_and_say_why(tmp_path: Path) -> None:
    for name, value in (("max_user_watches", "8192"), ("max_user_instances", "8"),
                        ("max_queued_events", "16384")):
        (tmp_path / name).write_text(value + "\n")
    [problem] = doctor.check_inotify(tmp_path)
    assert problem.level == "warning"
    assert "fs.inotify.max_user_instances is 8" in problem.message
    assert "opens its own inotify instance" in problem.message
