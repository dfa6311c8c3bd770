"""The floor: a bare rename+inotify loop moving files pending/ -> done/, fsync of file and dir.

No parsing, no ledger, no outcome record: the least any durable inotify spool must do per task.
With --no-fsync, the rename alone: the floor of a spool that trades durability for speed.

    python bare_loop.py PENDING_DIR DONE_DIR [--no-fsync]
"""

from __future__ import annotations

import os
import sys

from inotify_simple import INotify, flags


def finish(pending: str, done: str, done_fd: int, name: str) -> None:
    """Move one file to done/ and make the move durable (done_fd -1: no fsync)."""
    target = os.path.join(done, name)
    try:
        os.rename(os.path.join(pending, name), target)
    except FileNotFoundError:
        return
    if done_fd < 0:
        return
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(done_fd)


def main() -> None:
    """Scan once, then move each file as inotify reports it (blocking read: no polling)."""
    pending, done = sys.argv[1:3]
    durable = "--no-fsync" not in sys.argv[3:]
    done_fd = os.open(done, os.O_RDONLY | os.O_DIRECTORY) if durable else -1
    inotify = INotify()
    inotify.add_watch(pending, flags.MOVED_TO | flags.CLOSE_WRITE)
    for name in sorted(os.listdir(pending)):
        if not name.startswith("."):
            finish(pending, done, done_fd, name)
    while True:
        for event in inotify.read():
            if not event.name.startswith("."):
                finish(pending, done, done_fd, event.name)


if __name__ == "__main__":
    main()
