"""Commands the operator configures (hooks.on_finish, budget.alert_command): an argv, never a
shell; their failure is logged, never fatal.

A hook runs in its own process group and is killed with everything it started when it
outlives its timeout (`hooks.timeout_s`, default 60 s). At most MAX_RUNNING hooks run at once
per worker process; up to MAX_WAITING more wait their turn, and a hook past that is dropped
with a log line. Waiting keeps a burst of finished tasks from losing notifications; the bound
keeps a hung hook from piling up processes until systemd's TasksMax (the outcome files stay
the truth for anything a dropped hook would have said).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import weakref
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 60.0
MAX_RUNNING = 8
MAX_WAITING = 256


class _Gate:
    """The hooks of one event loop: a semaphore for those running, a count of those queued."""

    def __init__(self) -> None:
        self.running = asyncio.Semaphore(MAX_RUNNING)
        self.queued = 0  # running or waiting to run
        self.tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks


_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Gate] = \
    weakref.WeakKeyDictionary()


def hook_timeout(hooks: dict[str, Any]) -> float:
    """`hooks.timeout_s` of the config, or the default when it is absent or not a positive number."""
    value = hooks.get("timeout_s", DEFAULT_TIMEOUT_S)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        log.warning("hooks.timeout_s: expected a positive number of seconds, got %r; using %g",
                    value, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    return float(value)


def start(argv: list[str], env: dict[str, str], what: str,
          timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Run a configured argv in the background of the running loop (see run_argv)."""
    gate = _gate()
    task = asyncio.get_running_loop().create_task(run_argv(argv, env, what, timeout_s))
    gate.tasks.add(task)
    task.add_done_callback(gate.tasks.discard)


def _gate() -> _Gate:
    return _gates.setdefault(asyncio.get_running_loop(), _Gate())


async def run_argv(argv: list[str], env: dict[str, str], what: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Run a configured argv to completion (or its timeout) and log how it ended."""
    gate = _gate()
    if gate.queued >= MAX_RUNNING + MAX_WAITING:
        log.warning("%s %s dropped: %d hooks running and %d waiting (a hook hangs?)", what,
                    argv[0], MAX_RUNNING, MAX_WAITING)
        return
    gate.queued += 1
    try:
        async with gate.running:
            await _run(argv, env, what, timeout_s)
    finally:
        gate.queued -= 1


async def _run(argv: list[str], env: dict[str, str], what: str, timeout_s: float) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=env,
                                                    stdin=asyncio.subprocess.DEVNULL,
                                                    start_new_session=True)
    except OSError as exc:
        log.warning("%s %s could not run: %s", what, argv[0], exc.strerror)
        return
    try:
        status = await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        await _kill_group(proc)
        log.warning("%s %s did not finish within %g s; its process group was killed", what,
                    argv[0], timeout_s)
        return
    except asyncio.CancelledError:
        await _kill_group(proc)
        raise
    if status != 0:
        log.warning("%s %s exited with status %d", what, argv[0], status)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the hook's process group: it had its time, and nothing waits for its answer."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await proc.wait()
