"""inotify on the spool, and the in-memory order in which pending tasks are claimed.

inotify is only a wake-up: the directory is the truth. A worker scans pending/ once at start and
again if the event queue overflows; between scans, events feed the order, so a claim costs the
same with 10 or 100,000 tasks pending (a heap pop, not a listdir).

A watch follows a path, not an inode: a watched directory that is removed, renamed away or
replaced (a restore, `rm -r pending && mkdir pending`) is watched again at its path as soon
as a directory is there (its parent is watched for that), and the consumer is told to rescan.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import stat
import time
from pathlib import Path
from collections.abc import Iterator

from inotify_simple import INotify, flags

# IN_CLOSE_WRITE, not IN_CREATE or IN_MODIFY: a file `cp` is still writing is never read.
# IN_CREATE is watched only to refuse what never gets a close: symlinks, FIFOs, directories.
PENDING_MASK = flags.MOVED_TO | flags.CLOSE_WRITE | flags.CREATE
OUTCOME_MASK = flags.MOVED_TO | flags.CLOSE_WRITE
CLAIMS_MASK = flags.MOVED_FROM
OVERFLOW = ""  # the name of a rescan event: events may have been missed
_SELF = flags.IGNORED | flags.MOVE_SELF  # the watched directory itself left its path
_ARRIVALS = flags.CREATE | flags.MOVED_TO  # in a parent: a directory came to a watched path

log = logging.getLogger(__name__)


class Watcher:
    """Non-blocking inotify watches; `events()` yields (directory, name, mask)."""

    def __init__(self) -> None:
        self._inotify = INotify(nonblocking=True)
        self._dirs: dict[int, Path] = {}  # watch descriptor -> the path it stands for
        self._masks: dict[Path, int] = {}  # every path asked for, watched now or not
        self._parents: dict[int, Path] = {}  # watches on their parents

    def watch(self, directory: Path, mask: int) -> None:
        """Start watching a directory (and keep watching whatever directory is at its path).

        Its parent gets a watch of its own, so one Watcher cannot also watch that parent.
        """
        self._masks[directory] = mask | flags.MOVE_SELF
        if directory.parent not in self._parents.values():
            self._parents[self._inotify.add_watch(directory.parent, _ARRIVALS)] = \
                directory.parent
        self._dirs[self._inotify.add_watch(directory, self._masks[directory])] = directory

    def fileno(self) -> int:
        """The inotify descriptor, for select or an event loop."""
        return self._inotify.fileno()

    def events(self) -> Iterator[tuple[Path | None, str, int]]:
        """Pending events; (None, OVERFLOW, mask) when the consumer must rescan: the kernel
        queue overflowed, or a watched directory was replaced and the new one is watched."""
        for event in self._inotify.read(timeout=0):
            if event.mask & flags.Q_OVERFLOW:
                yield None, OVERFLOW, event.mask
            elif event.wd in self._parents:
                path = self._parents[event.wd] / event.name
                if event.mask & flags.ISDIR and path in self._masks and self._rewatch(path):
                    yield None, OVERFLOW, event.mask
            elif event.wd not in self._dirs:
                continue  # a watch we dropped; its IN_IGNORED trails behind
            elif event.mask & _SELF:
                # Not a file event, though its name is empty like OVERFLOW's.
                if self._rewatch(self._dirs[event.wd]):
                    yield None, OVERFLOW, event.mask
            else:
                yield self._dirs[event.wd], event.name, event.mask

    def _rewatch(self, path: Path) -> bool:
        """Watch what is at `path` now, dropping a watch on what was; True if that changed."""
        old = next((wd for wd, watched in self._dirs.items() if watched == path), None)
        try:
            wd = self._inotify.add_watch(path, self._masks[path] | flags.ONLYDIR)
        except OSError:
            wd = None  # nothing there yet: the parent's watch sees it come
        if wd == old:
            return False
        if old is not None:
            del self._dirs[old]
            try:
                self._inotify.rm_watch(old)
            except OSError:
                pass  # already gone with its directory
        if wd is None:
            log.warning("%s is gone; it is watched again when it is created", path)
            return False
        self._dirs[wd] = path
        log.warning("%s was replaced; watching the new one and rescanning", path)
        return True

    def wait(self, timeout: float | None) -> bool:
        """Block until an event is ready or `timeout` seconds pass; True when one is ready."""
        ready, _, _ = select.select([self.fileno()], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        """Release the inotify descriptor."""
        self._inotify.close()


REPO_LANE = "\0repo"  # a craftsman's repository tasks queue apart (no name holds a NUL)


def lane(craftsman: str, repository: bool) -> str:
    """The ready queue a task waits in: its craftsman's, or for a repository task (which also
    needs one of the home's worktrees) its craftsman's repository lane, so that a full set of
    worktrees never holds up the craftsman's other tasks."""
    return craftsman + REPO_LANE if repository else craftsman


def craftsman_of(key: str) -> str:
    """The craftsman a ready queue's key serves."""
    return key.removesuffix(REPO_LANE)


class ReadyQueue:
    """Claimable pending files per lane (a craftsman's, or its repository tasks'): priority 10
    first, then first come, first served."""

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, int, str]]] = {}
        self._live: dict[str, int] = {}  # name -> sequence of its current entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, name: str) -> bool:
        return name in self._live

    def push(self, craftsman: str, priority: int, name: str) -> None:
        """Queue a file (again): a later push of the same name replaces the earlier one."""
        seq = next(self._seq)
        self._live[name] = seq
        heapq.heappush(self._heaps.setdefault(craftsman, []), (-priority, seq, name))

    def discard(self, name: str) -> None:
        """Forget a file (claimed or rejected elsewhere); its heap entry is skipped lazily."""
        self._live.pop(name, None)

    def head(self, craftsman: str) -> tuple[int, int, str] | None:
        """The next entry for a craftsman without taking it."""
        heap = self._heaps.get(craftsman)
        while heap:
            _, seq, name = heap[0]
            if self._live.get(name) == seq:
                return heap[0]
            heapq.heappop(heap)
        return None

    def pop(self, craftsman: str) -> str | None:
        """Take the next file for a craftsman."""
        entry = self.head(craftsman)
        if entry is None:
            return None
        heapq.heappop(self._heaps[craftsman])
        del self._live[entry[2]]
        return entry[2]

    def clear(self) -> None:
        """Forget everything (before a rescan)."""
        self._heaps.clear()
        self._live.clear()


def scan_order(directory: Path) -> list[str]:
    """Entries of a directory, oldest first (FIFO for a scan), dot files left out."""
    entries = []
    with os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime_ns
            except FileNotFoundError:
                continue
            entries.append((mtime, entry.name))
    entries.sort()
    return [name for _, name in entries]


def settle_delay(directory: Path, name: str, grace_s: float) -> float:
    """Seconds after its IN_CREATE until a new entry of pending/ may be judged.

    0 for what arrives whole: anything but a regular file (refused unread; it never gets an
    IN_CLOSE_WRITE), and a regular file with more than one link (link(2) brought a file
    written elsewhere, with no IN_CLOSE_WRITE to wait for). A regular file with one link is
    being written (cp: judged at its IN_CLOSE_WRITE, which comes first) or was linked and its
    first name already removed: it is judged after grace_s, as a young file found by a scan.
    """
    try:
        info = os.lstat(directory / name)
    except FileNotFoundError:
        return 0.0
    if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
        return grace_s
    return 0.0


def wait_for_files(directories: list[Path], names: set[str], timeout: float | None) -> set[str]:
    """Block on inotify until each name exists in one of the directories; returns those found.

    Watches first, then looks, so a file that appears in between is not missed.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    watcher = Watcher()
    try:
        for directory in directories:
            watcher.watch(directory, OUTCOME_MASK)
        missing = {n for n in names if not any(os.path.lexists(d / n) for d in directories)}
        while missing:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            if not watcher.wait(left):
                continue
            for _, name, _ in watcher.events():
                if name == OVERFLOW:
                    missing = {n for n in missing
                               if not any(os.path.lexists(d / n) for d in directories)}
                else:
                    missing.discard(name)
        return names - missing
    finally:
        watcher.close()
