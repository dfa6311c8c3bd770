"""The file spool: task files moved by rename(2) between state directories (README: Layout of a
home; How it keeps its promises).

Every state change is one rename, so a task is always wholly in one directory. A claim renames
pending/NAME to in_progress/NAME@WORKER; publishing an outcome first renames that claim to
NAME@WORKER.fin. Whoever renames a claim first owns what happens next: a worker whose claim was
moved away (requeued, cancelled) finds it gone and discards its result. That rename is the fence.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from . import permissions, task as task_format
from ..errors import SpoolError
from .entries import (  # noqa: F401 (re-exported: the spool's names)
    CLAIM_RE, DISK_ERRNOS, NAME_MAX, SIDECAR, STATES, TRANSIENT_ERRNOS, Claim, Found, NoSpace,
    Refused, Unavailable, _entry_name)
from .lookup import Lookups
from .registry import Workers
from .store import Store
from .task import Task

log = logging.getLogger(__name__)


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40] or "host"


def new_worker_id() -> str:
    """An id naming host and pid, unique on this host: it appears in claim file names."""
    return f"{_hostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Spool(Lookups, Store):
    """The file store: the task directories of one home, moved between by rename(2)."""

    def __init__(self, home: Path, *, fsync: bool = True, max_task_bytes: int = 1_048_576) -> None:
        self.home = home
        self.fsync = fsync
        self.max_task_bytes = max_task_bytes
        tasks = home / "tasks"
        self.tmp = tasks / "tmp"
        self.pending = tasks / "pending"
        self.in_progress = tasks / "in_progress"
        self.completed = tasks / "completed"
        self.failed = tasks / "failed"
        self.workers = home / "run" / "workers"
        self.registry = Workers(self.workers)

    @classmethod
    def open(cls, home: Path, settings: Any = None) -> Spool:
        """A Spool on an initialised home; SpoolError naming the fix when it is not one."""
        kwargs = {}
        if settings is not None:
            kwargs = {"fsync": settings.fsync, "max_task_bytes": settings.max_task_bytes}
        spool = cls(home, **kwargs)
        permissions.require_entry(home)
        for path in (spool.tmp, spool.pending, spool.in_progress, spool.completed, spool.failed):
            if not path.is_dir():
                raise SpoolError(f"{home} is not a koubou home ({path} is missing); "
                                 f"run `koubou init --home {home}`")
        permissions.make_dir(spool.workers, permissions.OWNER_DIR, parents=True)
        return spool

    def state_dir(self, state: str) -> Path:
        """The directory of one state."""
        return {"pending": self.pending, "in_progress": self.in_progress,
                "completed": self.completed, "failed": self.failed}[state]

    # --- durability ------------------------------------------------------------------------

    def sync_dir(self, path: Path) -> None:
        """fsync a directory so the renames in it survive a crash (when spool.fsync is on)."""
        if not self.fsync:
            return
        # Opened each time, not cached: a Spool has no close, so cached descriptors leaked
        # one per short-lived Spool (the MCP server makes one a call), and a cached one kept
        # a replaced directory alive (and its inotify watch from ending). The open costs
        # microseconds beside the fsync's milliseconds.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_tmp(self, label: str, data: bytes) -> str:
        """A new file in tmp/ holding data, fsynced; NoSpace (and no file) when the disk refuses."""
        try:
            return self._staged(label, data)
        except OSError as exc:
            if exc.errno in DISK_ERRNOS:
                raise NoSpace.of(exc, self.home) from None
            raise

    def _staged(self, label: str, data: bytes) -> str:
        # The label only helps a person reading tmp/: cut, so a long name still fits NAME_MAX.
        path = f"{self.tmp}/.{label[:100]}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = permissions.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions.RECORD)
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    def write_atomic(self, directory: Path, name: str, data: bytes) -> None:
        """Write a file whole or not at all: tmp, fsync, rename, fsync of the directory."""
        tmp = self._write_tmp(name, data)
        os.rename(tmp, directory / name)
        self.sync_dir(directory)

    # --- submit ----------------------------------------------------------------------------

    def submit(self, tasks: Iterable[Task]) -> list[tuple[Task, str, bool]]:
        """Queue tasks atomically; returns (task, state, new) each. An existing id is left alone."""
        permissions.require_submit(self.home, self.tmp, self.pending)
        results = []
        now = time.time()
        for task in tasks:
            state = None if task.fresh_id else self._existing_state(task.id)
            new = False
            if state is None:
                state, new = "pending", self._link_pending(task, now)
            results.append((task, state, new))
        if any(new for _, _, new in results):
            self.sync_dir(self.pending)
        return results

    def _existing_state(self, task_id: str) -> str | None:
        """Where a task of this id is, or None.

        The directories are looked at in the order a task moves through them, so a task that
        moves on while we look is still seen; one requeued meanwhile is caught by the
        no-replace rename into pending/. A claim is looked past when its outcome is there:
        publish unlinks the claim (`.fin`) only after placing the outcome.
        """
        name = f"{task_id}.json"
        if os.path.lexists(f"{self.pending}/{name}"):
            return "pending"
        claimed = name + "@"
        if any(entry.startswith(claimed) for entry in os.listdir(self.in_progress)):
            return self.outcome_state(task_id) or "in_progress"
        return self.outcome_state(task_id)

    def _link_pending(self, task: Task, now: float) -> bool:
        raw = dict(task.raw)
        raw.setdefault("submitted_at", task_format.iso(now))
        tmp = self._write_tmp(task.id, task_format.encode(raw))
        try:
            rename_noreplace(tmp, self.pending / f"{task.id}.json")
            return True
        except FileExistsError:
            os.unlink(tmp)
            return False
        except BaseException as exc:
            os.unlink(tmp)  # nothing partial is left behind
            if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
                raise NoSpace.of(exc, self.home) from None
            raise

    # --- reading pending entries -----------------------------------------------------------

    def read_entry(self, directory: Path, name: str) -> tuple[bytes, os.stat_result]:
        """The bytes and stat of a regular file, never following a link or opening a FIFO."""
        path = f"{directory}/{name}"  # str, not Path: this runs twice a task
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise Refused("gone", gone=True) from None
        except OSError as exc:
            _raise_if_transient(exc, path)
            if exc.errno == errno.ELOOP:
                raise Refused("a symbolic link; tasks must be regular files") from None
            if exc.errno == errno.ENXIO:
                raise Refused("a FIFO or socket; tasks must be regular files") from None
            if exc.errno == errno.EACCES:
                raise Refused(_unreadable(path)) from None
            raise Refused(f"cannot be opened: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise Refused("a directory; tasks must be regular files")
            if not stat.S_ISREG(info.st_mode):
                raise Refused("not a regular file (FIFO, socket or device)")
            if info.st_size > self.max_task_bytes:
                raise Refused(f"{info.st_size} bytes, over spool.max_task_bytes "
                              f"({self.max_task_bytes})")
            data = _read_all(fd, self.max_task_bytes + 1)
            if len(data) > self.max_task_bytes:
                raise Refused(f"over spool.max_task_bytes ({self.max_task_bytes})")
            return data, info
        except OSError as exc:
            _raise_if_transient(exc, path)
            raise Refused(f"cannot be read: {exc.strerror}") from None
        finally:
            os.close(fd)

    def kind_of(self, directory: Path, name: str) -> str | None:
        """'file' for a regular file, 'other' for anything else, None when gone; never follows."""
        try:
            mode = os.lstat(directory / name).st_mode
        except FileNotFoundError:
            return None
        return "file" if stat.S_ISREG(mode) else "other"

    # --- claim and outcome -----------------------------------------------------------------

    def claim(self, name: str, worker_id: str) -> Claim | None:
        """Take pending/<name> by renaming it into in_progress/; None if another worker won.

        OSError when the rename cannot be made (a name too long for the claim's suffix)."""
        claim = Claim(name, worker_id, time.time())
        try:
            os.rename(f"{self.pending}/{name}", f"{self.in_progress}/{claim.file_name}")
        except FileNotFoundError:
            return None
        # No fsync here, on purpose: a claim lost in a crash leaves the task in pending/, where
        # it runs again. The outcome's fsync later makes this rename durable too (one journal).
        return claim

    def take_over(self, entry: str, worker_id: str) -> Claim | None:
        """Take another worker's claim in_progress/<entry> by renaming it to ours (a finishing
        marker kept); None when someone moved it first. The rename fences its old owner."""
        match = CLAIM_RE.fullmatch(entry)
        claim = Claim(match["name"], worker_id, time.time())
        taken = claim.file_name + (match["fin"] or "")
        try:
            os.rename(f"{self.in_progress}/{entry}", f"{self.in_progress}/{taken}")
        except FileNotFoundError:
            return None
        return claim

    def read_claim(self, claim: Claim) -> tuple[bytes, os.stat_result]:
        """The bytes of a claimed task file."""
        return self.read_entry(self.in_progress, claim.file_name)

    def publish(self, claim: Claim, task_id: str, record: dict[str, Any]) -> bool:
        """Publish an outcome for a claim; False (and nothing written) when the claim was revoked,
        or when another task of the same id has its outcome already: then this claim goes to
        failed/ as rejected input, and the first outcome stands.

        The fence comes first, so a revoked claim costs one failed rename and no write. NoSpace
        when the disk refuses the outcome: the claim is unfenced (still ours, in in_progress/)
        and nothing is left in tmp/; publish it again when the disk has room."""
        directory = self.completed if record["status"] == "completed" else self.failed
        claimed = f"{self.in_progress}/{claim.file_name}"
        finishing = claimed + ".fin"
        try:
            os.rename(claimed, finishing)
        except FileNotFoundError:
            return False
        # A crash from here on leaves a .fin with or without its outcome: recovery keeps the
        # outcome, or runs the task again.
        try:
            tmp = self._write_tmp(task_id, task_format.encode(record))
        except BaseException:
            self._unfence(finishing, claimed)
            raise
        try:
            self._place_outcome(tmp, directory, task_id)
        except FileExistsError:
            os.unlink(tmp)
            self.reject(self.in_progress, claim.file_name + ".fin", duplicate_reason(
                task_id, self.outcome_state(task_id) or "completed"))
            return False
        except OSError as exc:
            os.unlink(tmp)
            self._unfence(finishing, claimed)
            if exc.errno in DISK_ERRNOS:
                raise NoSpace.of(exc, self.home) from None
            raise
        self.sync_dir(directory)
        # A crash before this unlink leaves a .fin beside a published outcome: recovery removes it.
        os.unlink(finishing)
        return True

    def _unfence(self, finishing: str, claimed: str) -> None:
        """Give a fenced claim its claim name back: the outcome could not be written."""
        try:
            os.rename(finishing, claimed)
        except FileNotFoundError:
            pass  # taken over meanwhile (this worker was taken for dead): theirs now

    def _place_outcome(self, tmp: str, directory: Path, task_id: str) -> None:
        """Rename an outcome into place without replacing one; FileExistsError if the id has one.

        Two files with one id under different names both get claimed; the no-replace rename
        keeps the first outcome. Rejected input that bears the name is moved aside first."""
        name = f"{task_id}.json"
        if self.outcome_state(task_id) is not None:
            raise FileExistsError(errno.EEXIST, "an outcome exists", name)
        if os.path.lexists(f"{directory}/{name}{SIDECAR}"):
            aside = f"{name}.{task_format.new_id()}"
            os.rename(directory / name, directory / aside)
            os.rename(directory / (name + SIDECAR), directory / (aside + SIDECAR))
        rename_noreplace(tmp, directory / name)

    def requeue(self, claim_file: str, attempts: int | None) -> bool:
        """Put a claimed task back in pending/ with its attempt count; False if the claim is gone.

        The claim is fenced first, as publish does: renamed to its finishing name, so a cancel
        or a recoverer that moved it before has won, and one that comes later finds nothing to
        move. The rewrite then touches only the finishing file, which nobody else renames while
        this process lives (a crash leaves it to recovery, like any finishing claim)."""
        name = CLAIM_RE.fullmatch(claim_file)["name"]
        finishing = f"{claim_file}.fin"
        try:
            os.rename(self.in_progress / claim_file, self.in_progress / finishing)
        except FileNotFoundError:
            return False
        if attempts is not None:
            self._set_attempts(finishing, name, attempts)
        try:
            os.rename(self.in_progress / finishing, self.pending / name)
        except FileNotFoundError:
            return False  # this process was taken for dead and the claim taken over
        self.sync_dir(self.pending)
        return True

    def _set_attempts(self, entry: str, name: str, attempts: int) -> None:
        """Rewrite a fenced claim with its attempt count (tmp, then rename over it)."""
        try:
            obj = json.loads(self.read_entry(self.in_progress, entry)[0])
            obj["attempts"] = attempts
        except Unavailable as exc:
            # Back uncounted rather than stuck in in_progress/: one attempt may go unseen.
            log.warning("%s; %s goes back without its attempt count", exc, name)
            return
        except (Refused, ValueError, TypeError, AttributeError, RecursionError):
            return  # not a task object: it goes back as it is and is rejected when read again
        try:
            os.rename(self._write_tmp(name, task_format.encode(obj)), self.in_progress / entry)
        except NoSpace as exc:
            log.warning("%s; %s goes back without its attempt count", exc, name)

    def reject(self, directory: Path, entry: str, reason: str) -> str | None:
        """Move input that is not a valid task to failed/ unchanged, with its reason beside it.

        Returns the name it got in failed/, or None when another process moved it first.
        """
        name = CLAIM_RE.fullmatch(entry)["name"] if directory == self.in_progress else entry
        target = self._failed_name(name)
        try:
            os.rename(directory / entry, self.failed / target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot move %s to failed/: %s", directory / entry, exc.strerror)
            return None
        sidecar = {"file": printable(target), "original_name": printable(name),
                   "status": "failed",
                   "error": {"kind": "invalid", "message": printable(reason), "attempts": 0,
                             "at": task_format.iso(time.time())}}
        self.write_atomic(self.failed, target + SIDECAR, task_format.encode(sidecar))
        return target

    def _failed_name(self, name: str) -> str:
        """The name rejected input gets in failed/: its own, unless that is taken or leaves no
        room for the sidecar's suffix within NAME_MAX."""
        fits = len(os.fsencode(name)) + len(SIDECAR) <= NAME_MAX
        if fits and not os.path.lexists(self.failed / name) and not os.path.lexists(
                self.completed / name):
            return name
        room = NAME_MAX - len(SIDECAR) - 27  # "." and a new id
        return f"{os.fsdecode(os.fsencode(name)[:room])}.{task_format.new_id()}"

    # --- workers and their liveness (spool.registry) ---------------------------------------

    def register_worker(self, worker_id: str, info: dict[str, Any]) -> int:
        """Register a live worker (run/workers/<id>.lock, locked while it lives)."""
        return self.registry.register_worker(worker_id, info)

    def unregister_worker(self, worker_id: str, fd: int) -> None:
        """Remove a worker's lock file on a clean exit."""
        self.registry.unregister_worker(worker_id, fd)

    def remove_dead_workers(self, cutoff: float) -> int:
        """Delete the lock files of dead workers whose last heartbeat was before cutoff."""
        return self.registry.remove_dead_workers(cutoff)

    def orphaned_claims(self, lease_s: float) -> list[tuple[str, str]]:
        """(claim file, worker state) of claims whose worker is dead or has missed its lease."""
        return self.registry.orphaned_claims(self.claims(), lease_s)

    def worker_state(self, worker_id: str, lease_s: float, *, observed: bool = True) -> str:
        """'alive', 'stale' or 'dead': see registry.Workers.worker_state."""
        return self.registry.worker_state(worker_id, lease_s, observed=observed)

    def worker_ids(self) -> list[str]:
        """The ids of every registration in run/workers/, live or not, sorted."""
        return self.registry.worker_ids()

    def worker_info(self, worker_id: str) -> Any:
        """What a worker registered about itself; None when gone or unreadable."""
        return self.registry.worker_info(worker_id)


def _raise_if_transient(exc: OSError, path: str) -> None:
    if exc.errno in TRANSIENT_ERRNOS:
        raise Unavailable(f"{path} cannot be read now ({exc.strerror}); it stays where it is "
                          "and is read again later") from None


def duplicate_reason(task_id: str, state: str) -> str:
    """Why a second task with an id already finished is refused."""
    return (f"an outcome for id {task_id} already exists ({state}/{task_id}.json); an id "
            "runs once: give this task another id, or `koubou retry` the first")


def printable(text: str) -> str:
    """Text safe to write as UTF-8: undecodable bytes of a file name (surrogate escapes)
    become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def rename_noreplace(source: Path, target: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing the target.

    Two submits of one id then queue it once. renameat2 (Linux 3.15+, ext4, xfs, btrfs, tmpfs)
    also keeps the IN_MOVED_TO event workers wait for, which link(2) would not give.
    """
    try:
        renameat2 = _libc.renameat2
    except AttributeError:
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                     _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(target))
    # The file system cannot refuse for us: check, then rename (a narrow race for one id).
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    os.rename(source, target)


def _unreadable(path: str) -> str:
    try:
        info = os.lstat(path)
    except OSError:
        return "not readable by the workers' user"
    return (f"not readable by the workers' user (mode {stat.S_IMODE(info.st_mode):04o}, owner "
            f"{permissions.user_name(info.st_uid)}, group {permissions.group_name(info.st_gid)}); "
            "make task files group-readable (umask 027, or chmod g+r before copying them in), "
            "or submit with koubou-submit")


def _read_all(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
