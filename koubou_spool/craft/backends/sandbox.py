"""Bubblewrap around a command craftsman (`sandbox: bwrap`).

The system is read-only; the working directory (a repository task's worktree, else
outputs/<id>/), what the attempt names writable (a worktree's mirror, where its commits go) and
a private /tmp are writable, but for what the attempt names read-only under them (the mirror's
config and hooks, which koubou's own git commands outside the sandbox would obey); $HOME is a
private empty directory plus the craftsman's `sandbox_binds` (an agent's own login, e.g.
~/.claude). An agent that runs `rm -rf ~` or reads ~/.ssh reaches neither. It runs in its own
PID namespace and dies with its worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence

BWRAP = "bwrap"


def bwrap_argv(argv: Sequence[str], workdir: str, writable: Iterable[str] = (),
               binds: Iterable[str] = (), home: str | None = None, *,
               read_only: Iterable[str] = ()) -> list[str]:
    """The argv that runs `argv` under bubblewrap; binds that do not exist are left out."""
    home = home or os.path.expanduser("~")
    wrapped = [BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
               "--tmpfs", "/tmp", "--tmpfs", home]
    # After the tmpfs over $HOME, so a bind under it (the login, a home inside ~) shows through.
    for path in [os.path.expanduser(b) for b in binds]:
        if os.path.exists(path):
            wrapped += ["--bind", path, path]
    for path in (workdir, *writable):
        wrapped += ["--bind", path, path]
    # Last, so each covers the writable bind it lies under; a mount point cannot be replaced.
    for path in read_only:
        if os.path.lexists(path):
            wrapped += ["--ro-bind", path, path]
    return [*wrapped, "--chdir", workdir, "--setenv", "HOME", home, "--unshare-pid",
            "--die-with-parent", "--", *argv]


def problem() -> str | None:
    """Why bubblewrap cannot run here (one sentence), or None when it works."""
    if shutil.which(BWRAP) is None:
        return "bwrap is not installed; install the Debian package bubblewrap"
    try:
        done = subprocess.run([BWRAP, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                               "--unshare-pid", "--", "true"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not be run: {exc}"
    if done.returncode != 0:
        return ("bwrap cannot make its namespaces here (user namespaces may be off): "
                f"{done.stderr.strip()[-300:]}")
    return None
