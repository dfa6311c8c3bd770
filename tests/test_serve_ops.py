"""Operating `koubou serve`: its systemd unit, and `koubou doctor` looking at a running server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from koubou_spool.cli.koubou import cli
from serve_client import running

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "koubou-serve.service"


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is not installed; `apt-get install -y systemd`")
    koubou = shutil.which("koubou")
    assert koubou, "the koubou console script is not installed (pip install -e .)"
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/koubou ", f"{koubou} "))
    proc = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "koubou" in line] == []


def test_the_unit_is_hardened_like_the_workers() -> None:
    text = UNIT.read_text()
    for line in ("ExecStart=/usr/local/bin/koubou serve", "Restart=on-failure",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/koubou",
                 "KillSignal=SIGTERM", "EnvironmentFile=-/etc/koubou/env", "UMask=0027"):
        assert line in text.splitlines(), line


def doctor_serve(home: Path) -> dict:
    result = CliRunner().invoke(cli, ["doctor", "--home", str(home), "--json", "--timeout", "2"])
    document = json.JSONDecoder().raw_decode(result.output)[0]  # a failing doctor adds a line
    checks = {c["name"]: c for c in document["checks"]}
    return checks["serve"]


def write_port(home: Path, port: int) -> None:
    config = home / "config" / "koubou.yaml"
    config.write_text(config.read_text() + f"serve: {{port: {port}}}\n")


def test_doctor_checks_a_running_server_and_its_token(
        home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOUBOU_SERVE_TOKENS", "right")
    with running(home, tmp_path / "serve.log") as server:
        write_port(home, server.port)
        assert doctor_serve(home)["status"] == "ok"
        monkeypatch.setenv("KOUBOU_SERVE_TOKENS", "wrong")
        found = doctor_serve(home)
    assert found["status"] == "error"
    assert "refuses the token in KOUBOU_SERVE_TOKENS" in found["problems"][0]["message"]
    assert doctor_serve(home)["status"] == "ok"  # not running: serve is optional


def test_doctor_names_a_public_host_without_tokens(home: Path) -> None:
    config = home / "config" / "koubou.yaml"
    config.write_text(config.read_text() + "serve: {host: 0.0.0.0, port: 9}\n")
    found = doctor_serve(home)
    assert found["status"] == "error" and "will refuse to start" in found["problems"][0]["message"]
