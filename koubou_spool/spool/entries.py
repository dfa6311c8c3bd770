"""The names and kinds of spool entries: claim file names, sidecars, and what a lookup finds."""

from __future__ import annotations

import errno
import itertools
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpoolError

# NAME@WORKER+SEQ: the owner in the name, and a sequence that makes each claim's name unique,
# so an inotify event about an earlier claim of the same task is never taken for this one.
CLAIM_RE = re.compile(r"(?P<name>.+)@(?P<worker>[A-Za-z0-9-]+)(?:\+(?P<seq>[0-9]+))?"
                      r"(?P<fin>\.fin)?")
_claim_seq = itertools.count(1)
# A cluster bridge's worker id begins so (spool/bridge.py): its claims are the faces of tasks
# that run on other hosts, never attempts, and recovery gives them back uncounted.
BRIDGE_PREFIX = "bridge-"
SIDECAR = ".error.json"
STATES = ("pending", "in_progress", "completed", "failed")
NAME_MAX = 255  # bytes in one file name on ext4, xfs, btrfs and tmpfs


# The machine's trouble, not the file's: out of descriptors (each worker holds slot files per
# craftsman), out of memory, an I/O error. A good task read at such a moment must stay queued.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOMEM,
                              errno.ENOBUFS})
# The disk's trouble: no space, no quota left, or a home mounted read-only. Nothing is wrong
# with the task; what could not be written is written again when the disk has room.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


class Refused(Exception):
    """A pending entry that must not be read: not a regular file, too large, or gone."""

    def __init__(self, reason: str, gone: bool = False) -> None:
        super().__init__(reason)
        self.gone = gone


class Unavailable(SpoolError):
    """An entry that cannot be read now (TRANSIENT_ERRNOS): no verdict; read it again later."""


class NoSpace(SpoolError):
    """The home's disk refused a write (DISK_ERRNOS): full, over quota, or read-only."""

    @classmethod
    def of(cls, exc: OSError, home: Path) -> NoSpace:
        """The one sentence for a disk error met while writing under home."""
        if exc.errno == errno.EROFS:
            error = cls(f"{home} is on a read-only file system; nothing was written (remount it "
                        "read-write, or use another --home)")
        else:
            error = cls(f"no space left for {home} ({exc.strerror}); nothing was written "
                        "(free some space, then try again)")
        error.errno = exc.errno  # one argument keeps str() the sentence alone
        return error


@dataclass(frozen=True)
class Claim:
    """A task this worker holds: in_progress/<name>@<worker>. `claimed_at` is wall time, for
    records; `clock` is this process's monotonic time, for measuring (a clock step cannot
    make a duration negative)."""

    name: str
    worker_id: str
    claimed_at: float
    seq: int = field(default_factory=lambda: next(_claim_seq))
    clock: float = field(default_factory=time.monotonic, compare=False)

    @property
    def file_name(self) -> str:
        return f"{self.name}@{self.worker_id}+{self.seq}"


@dataclass
class Outcome:
    """One outcome on its way into completed/ or failed/: fenced (the claim is `finishing`),
    then written, placed and made durable by spool.files.Spool.write_outcomes, which fills in
    how it went. `placed`: it is in place (and durable, with fsync on); else `duplicate` (an
    outcome of this id stood first; the fenced claim is still there, for failed/), or `error`
    (nothing written, the claim unfenced: NoSpace when the disk refused it)."""

    claim: Claim
    task_id: str
    data: bytes
    directory: Path
    finishing: str
    tmp: str | None = None
    placed: bool = False
    duplicate: bool = False
    error: OSError | None = None


@dataclass(frozen=True)
class Found:
    """Where a task is: its state, its file, and whether it was rejected input."""

    state: str
    path: Path
    rejected: bool = False


def _entry_name(key: str) -> bool:
    """A name that can only mean an entry of a directory: one component, not hidden."""
    return bool(key) and "/" not in key and "\0" not in key and not key.startswith(".")


def duplicate_reason(task_id: str, state: str) -> str:
    """Why a second task with an id already finished is refused."""
    return (f"an outcome for id {task_id} already exists ({state}/{task_id}.json); an id "
            "runs once: give this task another id, or `koubou retry` the first")
