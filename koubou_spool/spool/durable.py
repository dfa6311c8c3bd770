"""Writing a file whole or not at all, for the files that live beside the spool's own (Batch
state, worktree journals, patches): tmp in the same directory, fsync, rename, fsync of the
directory. The spool's task and outcome files go through spool.files.Spool instead."""

from __future__ import annotations

import os
from pathlib import Path

from . import permissions
from .disk import write_all


def sync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the renames in it survive a crash."""
    # Opened each time, not cached: a cached descriptor leaked one per short-lived Spool (the
    # MCP server makes one a call) and kept a replaced directory (and its inotify watch) alive.
    # The open costs microseconds beside the fsync's milliseconds.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = permissions.RECORD) -> None:
    """Replace `path` with `data` durably, with exactly `mode` whatever the umask."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(3).hex()}")
    fd = permissions.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    sync_dir(path.parent)
