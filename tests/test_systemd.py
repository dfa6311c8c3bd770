"""The systemd units pass `systemd-analyze verify`, and the instance wrapper picks craftsmen."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import missing

ROOT = Path(__file__).resolve().parent.parent
UNITS = ("koubou-worker@.service", "koubou-maintain.service", "koubou-maintain.timer")
WRAPPER = "/usr/local/bin/koubou-worker-instance"
KOUBOU = "/usr/local/bin/koubou"


def systemd_analyze() -> str:
    return shutil.which("systemd-analyze") or missing("systemd-analyze",
                                                      "sudo apt-get install systemd")


def installable_copy(target: Path) -> None:
    """The units with their install paths pointed at this checkout and the installed koubou.

    verify checks that each ExecStart binary exists; the units name /usr/local/bin, where the
    README installs them, so the copy names where they are on this machine instead.
    """
    koubou = shutil.which("koubou")
    assert koubou, "the koubou console script is not installed (pip install -e .)"
    for name in UNITS:
        text = (ROOT / "systemd" / name).read_text()
        text = text.replace(WRAPPER, str(ROOT / "bin" / "koubou-worker-instance"))
        text = text.replace(f"{KOUBOU} ", f"{koubou} ")
        (target / name).write_text(text)
    # A template is verified through an instance of it.
    os.symlink("koubou-worker@.service", target / "koubou-worker@all.service")
    os.symlink("koubou-worker@.service", target / "koubou-worker@local.service")


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    installable_copy(tmp_path)
    units = ["koubou-worker@all.service", "koubou-worker@local.service",
             "koubou-maintain.service", "koubou-maintain.timer"]
    proc = subprocess.run([analyze, "verify", "--man=no", *[str(tmp_path / u) for u in units]],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys and bad values are only warnings to verify: they must not be there either.
    noise = [line for line in proc.stderr.splitlines() if "koubou" in line]
    assert noise == [], "\n".join(noise)


def test_units_keep_the_contract() -> None:
    worker = (ROOT / "systemd" / "koubou-worker@.service").read_text()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "KillSignal=SIGTERM",
                 "TimeoutStopSec=45", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/var/koubou", "PrivateTmp=yes", "ProtectHome=read-only",
                 "Environment=KOUBOU_HOME=/var/koubou", "EnvironmentFile=-/etc/koubou/env",
                 f"ExecStart={WRAPPER} %i", "UMask=0027", "Group=koubou"):
        assert line in worker.splitlines(), line
    timer = (ROOT / "systemd" / "koubou-maintain.timer").read_text()
    assert "Persistent=true" in timer and "OnCalendar=daily" in timer
    assert "Type=oneshot" in (ROOT / "systemd" / "koubou-maintain.service").read_text()


def test_the_instance_wrapper_serves_all_or_one_craftsman(tmp_path: Path) -> None:
    fake = tmp_path / "koubou"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    wrapper = str(ROOT / "bin" / "koubou-worker-instance")
    for instance, argv in (("all", "worker"), ("local", "worker --craftsman local")):
        proc = subprocess.run([wrapper, instance], capture_output=True, text=True, env=env,
                              timeout=30)
        assert proc.returncode == 0 and proc.stdout.strip() == argv
