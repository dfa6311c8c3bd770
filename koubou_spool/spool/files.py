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
import fcntl
import itertools
import json
import logging
import os
import re
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Iterable, Iterator

from . import permissions, task as task_format
from ..errors import SpoolError, TaskNotFound
from .store import Store
from .task import Task

log = logging.getLogger(__name__)

# NAME@WORKER+SEQ: the owner in the name, and a sequence that makes each claim's name unique,
# so an inotify event about an earlier claim of the same task is never taken for this one.
CLAIM_RE = re.compile(r"(?P<name>.+)@(?P<worker>[A-Za-z0-9-]+)(?:\+(?P<seq>[0-9]+))?"
                      r"(?P<fin>\.fin)?")
_claim_seq = itertools.count(1)
SIDECAR = ".error.json"
NAME_MAX = 255  # bytes in one file name on ext4, xfs, btrfs and tmpfs


# The machine's trouble, not the file's: out of descriptors (each worker holds slot files per
# craftsman), out of memory, an I/O error. A good task read at such a moment must stay queued.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOMEM,
                              errno.ENOBUFS})


class Refused(Exception):
    """A pending entry that must not be read: not a regular file, too large, or gone."""

    def __init__(self, reason: str, gone: bool = False) -> None:
        super().__init__(reason)
        self.gone = gone


class Unavailable(SpoolError):
    """An entry that cannot be read now (TRANSIENT_ERRNOS): no verdict; read it again later."""


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


@dataclass(frozen=True)
class Found:
    """Where a task is: its state, its file, and whether it was rejected input."""

    state: str
    path: Path
    rejected: bool = False


class Heartbeats:
    """When this process saw each live worker's heartbeat (its lock file's mtime) last change,
    on this process's own monotonic clock.

    Lock-file mtimes are set by each worker from its own wall clock: comparing them with ours
    lets a clock step (or a suspend longer than the lease) make every peer look stale at once,
    and a step back hide a hung one. So the mtime is only compared with itself: a worker is
    stale once its mtime has not changed for lease_s of our monotonic time, counted from when
    we first saw that value. Whether it is dead at all is its lock's business, not a clock's.
    """

    def __init__(self) -> None:
        self._seen: dict[str, tuple[int, float]] = {}  # worker id -> (mtime_ns, first seen)

    def stale(self, worker_id: str, mtime_ns: int, lease_s: float) -> bool:
        """Whether this heartbeat value has stood unchanged for longer than lease_s."""
        now = time.monotonic()
        seen = self._seen.get(worker_id)
        if seen is None or seen[0] != mtime_ns:
            self._seen[worker_id] = (mtime_ns, now)
            return False
        return now - seen[1] > lease_s

    def forget(self, worker_id: str) -> None:
        """A worker is gone."""
        self._seen.pop(worker_id, None)


def _hostname() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:40] or "host"


def new_worker_id() -> str:
    """An id naming host and pid, unique on this host: it appears in claim file names."""
    return f"{_hostname()}-{os.getpid()}-{os.urandom(2).hex()}"


class Spool(Store):
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
        self.heartbeats = Heartbeats()

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
        except BaseException:
            os.unlink(tmp)  # nothing partial is left behind
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

    def read_claim(self, claim: Claim) -> tuple[bytes, os.stat_result]:
        """The bytes of a claimed task file."""
        return self.read_entry(self.in_progress, claim.file_name)

    def publish(self, claim: Claim, task_id: str, record: dict[str, Any]) -> bool:
        """Publish an outcome for a claim; False (and nothing written) when the claim was revoked,
        or when another task of the same id has its outcome already: then this claim goes to
        failed/ as rejected input, and the first outcome stands."""
        directory = self.completed if record["status"] == "completed" else self.failed
        tmp = self._write_tmp(task_id, task_format.encode(record))
        claimed = f"{self.in_progress}/{claim.file_name}"
        finishing = claimed + ".fin"
        try:
            os.rename(claimed, finishing)
        except FileNotFoundError:
            os.unlink(tmp)
            return False
        try:
            self._place_outcome(tmp, directory, task_id)
        except FileExistsError:
            os.unlink(tmp)
            self.reject(self.in_progress, claim.file_name + ".fin", duplicate_reason(
                task_id, self.outcome_state(task_id) or "completed"))
            return False
        self.sync_dir(directory)
        # A crash before this unlink leaves a .fin beside a published outcome: recovery removes it.
        os.unlink(finishing)
        return True

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
        os.rename(self._write_tmp(name, task_format.encode(obj)), self.in_progress / entry)

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

    # --- lookups ---------------------------------------------------------------------------

    def names(self, state: str) -> list[str]:
        """Entries of one state directory, without sidecars, dot files or finishing markers."""
        directory = self.state_dir(state)
        return [n for n in os.listdir(directory)
                if not n.startswith(".") and not n.endswith(SIDECAR) and not n.endswith(".fin")]

    def claims(self) -> Iterator[tuple[str, re.Match]]:
        """Every claim file in in_progress/ with its parsed name."""
        for entry in os.listdir(self.in_progress):
            match = CLAIM_RE.fullmatch(entry)
            if match:
                yield entry, match

    def find(self, key: str) -> Found:
        """Where the task with this id (or the file with this name) is; TaskNotFound if nowhere.

        A key that is neither an id nor a plain entry name (a path, `..`, a hidden name) is
        nowhere: the lookup never leaves the state directories.
        """
        if not (task_format.ID_RE.fullmatch(key) or _entry_name(key)):
            raise TaskNotFound(f"no task {key!r}: give a task id ({task_format.ID_RULE}) "
                               "or the name of a file in the spool")
        name = key if key.endswith(".json") else f"{key}.json"
        for state in ("completed", "failed"):
            path = self.state_dir(state) / name
            if os.path.lexists(path):
                return Found(state, path, os.path.lexists(str(path) + SIDECAR))
        for entry, match in self.claims():
            if match["name"] in (name, key):
                return Found("in_progress", self.in_progress / entry)
        for candidate in (name, key):
            if os.path.lexists(self.pending / candidate):
                return Found("pending", self.pending / candidate)
        if os.path.lexists(self.failed / key):
            return Found("failed", self.failed / key, True)
        found = self._find_by_content(key)
        if found is None:
            raise TaskNotFound(f"no task {key!r} in {self.home}; `koubou list` shows what is there")
        return found

    def _find_by_content(self, task_id: str) -> Found | None:
        """A dropped file whose name is not its id: read the few that are queued or running."""
        for state in ("in_progress", "pending"):
            directory = self.state_dir(state)
            for entry in os.listdir(directory):
                try:
                    obj = task_format.decode(self.read_entry(directory, entry)[0])
                except (Refused, Unavailable, ValueError):
                    continue
                if isinstance(obj, dict) and task_id in (obj.get("id"), obj.get("custom_id")):
                    return Found(state, directory / entry)
        return None

    def outcome_state(self, task_id: str) -> str | None:
        """'completed' or 'failed' when the task has an outcome file, else None. No read: a
        rejected input that happens to bear the name (it has a sidecar) is no outcome."""
        name = f"{task_id}.json"
        for state, directory in (("completed", self.completed), ("failed", self.failed)):
            if os.path.lexists(f"{directory}/{name}") and not os.path.lexists(
                    f"{directory}/{name}{SIDECAR}"):
                return state
        return None

    def outcome(self, task_id: str) -> dict[str, Any] | None:
        """The outcome record of a finished task, or None while it is not finished."""
        if not task_format.ID_RE.fullmatch(task_id):
            raise TaskNotFound(f"no task {task_id!r}: a task id is {task_format.ID_RULE}")
        for directory in (self.completed, self.failed):
            path = directory / f"{task_id}.json"
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            sidecar = Path(str(path) + SIDECAR)
            if sidecar.exists():
                return json.loads(sidecar.read_bytes())
            return json.loads(data)
        return None

    # --- workers and their liveness --------------------------------------------------------

    def register_worker(self, worker_id: str, info: dict[str, Any]) -> int:
        """Create and lock run/workers/<id>.lock; the lock dies with the process, whatever kills it.

        The file is locked under a hidden name and renamed into place, so a lock file that can
        be locked is dead for good: probes never race a worker that is starting.
        """
        staging = self.workers / f".{worker_id}.lock.new"
        fd = permissions.open_file(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, permissions.RECORD)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps(info).encode())
        os.rename(staging, self.workers / f"{worker_id}.lock")
        return fd

    def unregister_worker(self, worker_id: str, fd: int) -> None:
        """Remove a worker's lock file on a clean exit."""
        try:
            os.unlink(self.workers / f"{worker_id}.lock")
        finally:
            os.close(fd)

    def remove_dead_workers(self, cutoff: float) -> int:
        """Delete the lock files of dead workers whose last heartbeat was before cutoff."""
        removed = 0
        for entry in os.listdir(self.workers):
            try:
                fd = os.open(self.workers / entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue  # gone, or not a plain file: not ours to judge
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its worker lives
                if os.fstat(fd).st_mtime < cutoff:
                    os.unlink(self.workers / entry)
                    removed += 1
            except (BlockingIOError, FileNotFoundError):
                pass
            finally:
                os.close(fd)
        return removed

    def orphaned_claims(self, lease_s: float) -> list[tuple[str, str]]:
        """(claim file, worker state) of claims whose worker is dead or has missed its lease."""
        states: dict[str, str] = {}
        orphans = []
        for entry, match in self.claims():
            worker = match["worker"]
            if worker not in states:
                states[worker] = self.worker_state(worker, lease_s)
            if states[worker] != "alive":
                orphans.append((entry, states[worker]))
        return orphans

    def worker_state(self, worker_id: str, lease_s: float, *, observed: bool = True) -> str:
        """'alive', 'stale' (lock held, heartbeat unchanged for lease_s as this process saw
        it: see Heartbeats) or 'dead' (lock free: the kernel drops it with the process).

        observed=False judges staleness by the heartbeat's wall-clock age instead, for a
        one-shot look by a person (`koubou workers`), never for taking claims over."""
        path = self.workers / f"{worker_id}.lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.heartbeats.forget(worker_id)
            return "dead"
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            mtime = os.fstat(fd).st_mtime_ns
            if not observed:
                return "stale" if time.time() - mtime / 1e9 > lease_s else "alive"
            return "stale" if self.heartbeats.stale(worker_id, mtime, lease_s) else "alive"
        finally:
            os.close(fd)
        self.heartbeats.forget(worker_id)
        return "dead"


def _raise_if_transient(exc: OSError, path: str) -> None:
    if exc.errno in TRANSIENT_ERRNOS:
        raise Unavailable(f"{path} cannot be read now ({exc.strerror}); it stays where it is "
                          "and is read again later") from None


def _entry_name(key: str) -> bool:
    """A name that can only mean an entry of a directory: one component, not hidden."""
    return bool(key) and "/" not in key and "\0" not in key and not key.startswith(".")


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
