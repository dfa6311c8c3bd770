"""Which home a command uses (README: Layout of a home): pure path logic, on pyfakefs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pyfakefs.fake_filesystem_unittest import Patcher

from koubou_spool.spool import home as home_module


@pytest.fixture
def fs_home(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("KOUBOU_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/me")
    with Patcher() as patcher:
        patcher.fs.create_dir("/home/me")
        yield patcher.fs


def test_option_beats_environment_beats_defaults(fs_home, monkeypatch) -> None:
    monkeypatch.setenv("KOUBOU_HOME", "/srv/spool")
    assert str(home_module.resolve("/elsewhere")) == "/elsewhere"
    assert str(home_module.resolve()) == "/srv/spool"


def test_var_koubou_when_it_can_be_created(fs_home) -> None:
    fs_home.create_dir("/var")
    assert str(home_module.resolve()) == "/var/koubou"


def test_user_home_when_var_koubou_is_not_writable(fs_home) -> None:
    fs_home.create_dir("/var/koubou")
    os.chmod("/var/koubou", 0o555)
    fs_home.is_windows_fs = False
    if os.access("/var/koubou", os.W_OK):  # running as root: make /var itself unusable
        fs_home.remove_object("/var/koubou")
        fs_home.remove_object("/var")
    assert str(home_module.resolve()) == "/home/me/.local/share/koubou"


def test_init_creates_the_layout_and_a_private_config(fs_home) -> None:
    made = home_module.init(Path("/home/me/k"))
    for part in ("tasks/tmp", "tasks/pending", "tasks/in_progress", "tasks/completed",
                 "tasks/failed", "db", "outputs", "run/workers"):
        assert Path("/home/me/k", part).is_dir(), part
    config = Path("/home/me/k/config/koubou.yaml")
    assert str(config) in map(str, made) and oct(config.stat().st_mode & 0o777) == "0o600"
    assert home_module.init(Path("/home/me/k")) == []
