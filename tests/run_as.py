"""Run a command as another account, for the permission tests; started as root.

    python run_as.py USER UMASK [--cover DIR --via CHILD --stash EMPTY_DIR] -- ARGV...

Drops to USER with her groups (as `setpriv --init-groups` does), sets UMASK and execs ARGV, so
the command is the same process the test waits for and signals.

With --cover, it must run in a private mount namespace (`unshare --mount --propagation
private`): DIR (a directory other accounts cannot enter, such as /root holding pyenv) is covered
by a tmpfs holding only CHILD, bound from the real one, so the account can run this very
interpreter while the real DIR stays closed. Nothing outside the namespace changes, and it
goes when the command ends.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path


def cover(directory: Path, child: Path, stash: Path) -> None:
    """Leave only `child` visible in `directory`, and the tmpfs enterable by anyone."""
    subprocess.run(["mount", "--bind", str(child), str(stash)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", str(directory)],
                   check=True)
    (directory / child.name).mkdir()
    subprocess.run(["mount", "--bind", str(stash), str(directory / child.name)], check=True)


def become(user: str, umask: int) -> None:
    """Switch to the account and its groups for good."""
    entry = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, entry.pw_gid))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.umask(umask)


def main(args: list[str]) -> None:
    split = args.index("--")
    options, argv = args[:split], args[split + 1:]
    user, umask = options[0], int(options[1], 8)
    if "--cover" in options:
        named = dict(zip(options[2::2], options[3::2], strict=True))
        cover(Path(named["--cover"]), Path(named["--via"]), Path(named["--stash"]))
    become(user, umask)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
