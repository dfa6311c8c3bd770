"""Spool changes as they happen, for a long-running asyncio face (the HTTP server).

One inotify descriptor on the four state directories, read by the event loop: every change
becomes an event for the subscribers (the server-sent event stream, the batch runner), and the
arrival of an outcome wakes whoever waits for that task. inotify is only a wake-up: a waiter
looks at the directory after it registered, and an overflow tells subscribers to look again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from inotify_simple import flags

from ..spool import task as task_format
from ..spool.files import CLAIM_RE, SIDECAR, STATES, Spool
from ..spool.watcher import OVERFLOW, Watcher

log = logging.getLogger(__name__)

ADDED = flags.MOVED_TO | flags.CLOSE_WRITE
REMOVED = flags.MOVED_FROM | flags.DELETE
MASK = ADDED | REMOVED
QUEUE_SIZE = 1000


def describe(state: str, name: str, mask: int) -> dict[str, Any] | None:
    """The event for one change of a state directory, or None for files that are not tasks."""
    if name.startswith(".") or name.endswith(SIDECAR) or name.endswith(".fin"):
        return None
    worker = None
    if state == "in_progress":
        match = CLAIM_RE.fullmatch(name)
        if not match or match["fin"]:
            return None
        name, worker = match["name"], match["worker"]
    event = {"state": state, "change": "added" if mask & ADDED else "removed", "file": name,
             "id": task_format.id_from_name(name), "at": task_format.iso(time.time())}
    if worker:
        event["worker_id"] = worker
    return event


class SpoolEvents:
    """The spool's changes for subscribers and waiters; start() on the running loop."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._watcher: Watcher | None = None
        self._subscribers: set[asyncio.Queue] = set()
        self._waiters: dict[str, set[asyncio.Future]] = {}
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self._states: dict[str, str] = {}

    def start(self) -> None:
        """Watch the state directories from the running event loop."""
        watcher = self.spool.watch(STATES, MASK)
        self._states = {str(self.spool.state_dir(state)): state for state in STATES}
        asyncio.get_running_loop().add_reader(watcher.fileno(), self._readable)
        self._watcher = watcher

    def close(self) -> None:
        """Stop watching; waiters still waiting see a timeout, subscribers an end."""
        if self._watcher is not None:
            asyncio.get_running_loop().remove_reader(self._watcher.fileno())
            self._watcher.close()
            self._watcher = None
        for queue in self._subscribers:
            _offer(queue, None)

    # --- subscribers -------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue:
        """A queue of events (dicts); None means the stream ended."""
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        """Stop delivering to a queue."""
        self._subscribers.discard(queue)

    def listen(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call listener(event) for every event, on the loop (it must not block)."""
        self._listeners.append(listener)

    # --- waiting for one outcome -------------------------------------------------------------

    async def outcome(self, task_id: str, timeout: float) -> dict[str, Any] | None:
        """The task's outcome record, waiting up to timeout seconds; None if still unfinished."""
        name = f"{task_id}.json"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            future = loop.create_future()
            self._waiters.setdefault(name, set()).add(future)
            try:
                record = self.spool.outcome(task_id)  # after registering: nothing slips between
                left = deadline - loop.time()
                if record is not None or left <= 0:
                    return await self._durable(record)
                try:
                    await asyncio.wait_for(future, left)
                except TimeoutError:
                    return await self._durable(self.spool.outcome(task_id))
            finally:
                waiting = self._waiters.get(name)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiters[name]

    async def _durable(self, record: dict[str, Any] | None) -> dict[str, Any] | None:
        """An outcome is answered only once durable: its directory fsynced (in a thread, off
        the loop), as `koubou wait` does (Spool.sync_outcomes)."""
        if record is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.spool.sync_outcomes)
        return record

    # --- the reader ----------------------------------------------------------------------------

    def _readable(self) -> None:
        try:
            changes = list(self._watcher.events()) if self._watcher else []
        except OSError as exc:  # pragma: no cover - the descriptor went away
            log.warning("spool events: %s", exc)
            return
        for directory, name, mask in changes:
            if name == OVERFLOW:
                self._overflowed()
                continue
            event = describe(self._states.get(str(directory), ""), name, mask)
            if event is not None:
                self._deliver(event, name)

    def _deliver(self, event: dict[str, Any], name: str) -> None:
        if event["change"] == "added" and event["state"] in ("completed", "failed"):
            self._wake(name)
        for queue in self._subscribers:
            _offer(queue, event)
        for listener in self._listeners:
            listener(event)

    def _wake(self, name: str) -> None:
        for future in self._waiters.get(name, ()):
            if not future.done():
                future.set_result(True)

    def _overflowed(self) -> None:
        """Events were lost: every waiter looks again, every subscriber is told to."""
        for name in list(self._waiters):
            self._wake(name)
        event = {"state": None, "change": "overflow", "at": task_format.iso(time.time())}
        for queue in self._subscribers:
            _offer(queue, event)
        for listener in self._listeners:
            listener(event)


def _offer(queue: asyncio.Queue, event: dict[str, Any] | None) -> None:
    """Put without blocking; a subscriber too slow to keep up gets an overflow instead."""
    try:
        queue.put_nowait(event)
    except asyncio.QueueFull:
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait({"state": None, "change": "overflow", "at": task_format.iso(time.time())})
