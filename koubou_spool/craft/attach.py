"""Attached files (`files`, `--attach`): text files under `attach.allowed_dirs`, size-capped.

Paths are resolved (symlinks followed) before the check, so a link cannot lead outside the
allowed directories. The checked path is then opened one component at a time from the allowed
directory, following no link, and the opened descriptor is what is judged: a file or directory
swapped for a link between the check and the open (to /proc/self/environ, say) is refused, not
read. Binary files are refused rather than sent as mojibake.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidTask

DEFAULT_MAX_BYTES = 256 * 1024


@dataclass(frozen=True)
class Attachment:
    """One attached file's path (as given) and text."""

    path: str
    text: str


def _allowed(config: dict[str, Any]) -> list[Path]:
    return [Path(os.path.expanduser(d)).resolve() for d in config.get("allowed_dirs") or ()]


def read_attachments(paths: list[str], config: dict[str, Any]) -> list[Attachment]:
    """Read every attached file, or raise InvalidTask saying which one and why."""
    if not paths:
        return []
    allowed = _allowed(config)
    if not allowed:
        raise InvalidTask("files: attachments are off; list the directories they may come from "
                          "in the config under attach.allowed_dirs")
    limit = int(config.get("max_bytes", DEFAULT_MAX_BYTES))
    return [_read(path, allowed, limit) for path in paths]


def _read(given: str, allowed: list[Path], limit: int) -> Attachment:
    path = Path(os.path.expanduser(given))
    if not path.is_absolute():
        raise InvalidTask(f"files: {given!r} must be an absolute path")
    real = path.resolve()
    root = next((root for root in allowed if real == root or root in real.parents), None)
    if root is None:
        raise InvalidTask(f"files: {given!r} is outside attach.allowed_dirs")
    try:
        fd = _open_beneath(root, real.relative_to(root).parts)
    except OSError as exc:
        raise InvalidTask(f"files: cannot read {given!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidTask(f"files: {given!r} is not a regular file")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InvalidTask(f"files: {given!r} is over attach.max_bytes ({limit} bytes)")
    if b"\0" in data:
        raise InvalidTask(f"files: {given!r} is binary; only text files can be attached")
    try:
        return Attachment(given, data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidTask(f"files: {given!r} is not UTF-8 text") from None


def _open_beneath(root: Path, parts: tuple[str, ...]) -> int:
    """Open root/parts... without following a link at any step (ELOOP if one appeared)."""
    nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        try:
            # O_NONBLOCK: a FIFO put in the file's place must not hang the worker in open(2).
            flags = nofollow | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            next_fd = os.open(part, flags, dir_fd=fd)
        finally:
            os.close(fd)
        fd = next_fd
    return fd
