"""A task's `verify` command: run in the worktree, in a process group of its own, under a deadline.

At the deadline the whole group gets SIGTERM, then SIGKILL after a short grace: a test runner's
children (a dev server, a hung subprocess) go with it; so it does when its attempt is stopped
(`stop` set: a cancel, a worker out of its grace). The leader is left unreaped (waitid WNOWAIT)
until its group has been signalled, so the group id cannot have been reused by then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..spool.permissions import CHILD_UMASK
from .git import StrPath, strip_git_env

TAIL_BYTES = 4096
KILL_GRACE_S = 0.5


class _Tail:
    """The last `limit` bytes of a stream, read in a thread of its own."""

    def __init__(self, fd: int, limit: int) -> None:
        self.fd, self.limit, self.data = fd, limit, bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while chunk := os.read(self.fd, 65536):
                self.data += chunk
                del self.data[:-self.limit]
        finally:
            os.close(self.fd)

    def text(self, wait_s: float) -> str:
        self.thread.join(wait_s)  # a grandchild that left the group may hold the pipe open
        return bytes(self.data).decode("utf-8", errors="replace")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _exited(pid: int, timeout_s: float | None, wake: threading.Event | None = None) -> bool:
    """Wait up to `timeout_s` for `pid` to exit, without reaping it; whether it did. `wake`,
    set by another thread, ends the wait early."""
    done = threading.Event()
    wake = wake or done

    def wait() -> None:
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        done.set()
        wake.set()

    threading.Thread(target=wait, daemon=True).start()
    wake.wait(timeout_s)
    return done.is_set()


def _environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    # The user's locale (a test suite may need it), but no GIT_DIR pointing away from the worktree.
    return {**strip_git_env(os.environ), "GIT_TERMINAL_PROMPT": "0", **(extra or {})}


def run_verify(argv: Sequence[str], worktree: StrPath, timeout_s: float, *,
               env: Mapping[str, str] | None = None, tail_bytes: int = TAIL_BYTES,
               stop: threading.Event | None = None) -> dict[str, Any]:
    """Run `argv` in the worktree; {argv, exit_code, duration_s, output_tail, timed_out}.

    exit_code is the command's status, or minus the signal that ended it (as subprocess has it);
    127 or 126 when it cannot be started. stdout and stderr are one stream; only its tail is kept.
    `stop`, once set, ends the command as its deadline would (timed_out stays False).
    """
    started = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), cwd=Path(worktree), env=_environment(env),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, umask=CHILD_UMASK)
    except OSError as exc:
        return _result(argv, 127 if isinstance(exc, FileNotFoundError) else 126, started,
                       f"{argv[0] if argv else ''}: {exc.strerror}", False)
    tail = _Tail(os.dup(proc.stdout.fileno()), tail_bytes)
    proc.stdout.close()
    ended = _exited(proc.pid, timeout_s, stop)
    timed_out = not ended and not (stop is not None and stop.is_set())
    if not ended:
        _signal_group(proc.pid, signal.SIGTERM)
        _exited(proc.pid, KILL_GRACE_S)
    _signal_group(proc.pid, signal.SIGKILL)  # whatever of the group is left, leader or not
    proc.wait()
    return _result(argv, proc.returncode, started, tail.text(KILL_GRACE_S), timed_out)


def _result(argv: Sequence[str], code: int, started: float, output: str, timed_out: bool) -> dict[str, Any]:
    return {"argv": list(argv), "exit_code": code, "duration_s": round(time.monotonic() - started, 3),
            "output_tail": output, "timed_out": timed_out}
