"""Configured commands (hooks.on_finish, alert_command): bounded in time and in number."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from koubou_spool import hooks

# Each hook notes its pid and its child's, counts the hooks alive as it starts, then hangs.
HANGING = """
import os, subprocess, sys, time
seen = sys.argv[1]
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
running = sum(alive(int(n)) for n in os.listdir(seen) if not n.startswith("c")) + 1
open(os.path.join(seen, f"c{child.pid}"), "w").close()
open(os.path.join(seen, str(os.getpid())), "w").write(str(running))
time.sleep(30)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_hanging_hooks_are_killed_at_their_timeout_and_at_most_eight_run(
        tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    seen.mkdir()
    argv = [sys.executable, "-c", HANGING, str(seen)]

    async def twenty() -> None:
        await asyncio.wait_for(asyncio.gather(*(
            hooks.run_argv(argv, dict(os.environ), "hooks.on_finish", timeout_s=1.0)
            for _ in range(20))), 60)

    asyncio.run(twenty())
    counts = [int(p.read_text()) for p in seen.iterdir() if not p.name.startswith("c")]
    assert len(counts) == 20  # all ran: the twelve past the cap waited their turn
    assert max(counts) <= hooks.MAX_RUNNING
    pids = [int(p.name.lstrip("c")) for p in seen.iterdir()]
    deadline = time.monotonic() + 5  # SIGKILL is delivered at once, death takes a moment
    while [pid for pid in pids if _alive(pid)]:
        assert time.monotonic() < deadline, "a hook or its child outlived the timeout"
        time.sleep(0.05)


def test_hooks_past_the_waiting_bound_are_dropped_with_a_log_line(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        tmp_path: Path) -> None:
    monkeypatch.setattr(hooks, "MAX_RUNNING", 1)
    monkeypatch.setattr(hooks, "MAX_WAITING", 1)
    ran = tmp_path / "ran"
    argv = [sys.executable, "-c", f"open({str(ran)!r}, 'a').write('x')"]

    async def five() -> None:
        await asyncio.gather(*(hooks.run_argv(argv, dict(os.environ), "hooks.on_finish")
                               for _ in range(5)))

    with caplog.at_level(logging.WARNING, logger="koubou_spool.hooks"):
        asyncio.run(five())
    assert ran.read_text() == "xx"
    assert caplog.text.count("dropped: 1 hooks running and 1 waiting") == 3


def test_hook_timeout_comes_from_the_config_with_a_default() -> None:
    assert hooks.hook_timeout({}) == hooks.DEFAULT_TIMEOUT_S == 60
    assert hooks.hook_timeout({"timeout_s": 5}) == 5.0
    assert hooks.hook_timeout({"timeout_s": "soon"}) == hooks.DEFAULT_TIMEOUT_S
