"""What wakes `koubou cluster`'s bridge (service/bridging.py): inotify on the home's pending/,
completed/ and failed/, a LISTEN thread on the cluster's channels, a stop, and the caller's
heartbeat timeout, all in one select(2).

The listener thread turns each NOTIFY (and a reconnect's one re-check) into a flag and a byte
on a pipe; the loop reads the pipe and takes the flags. Nothing polls: between events the
bridge sleeps in select until its next heartbeat.
"""

from __future__ import annotations

import os
import select
import threading
from dataclasses import dataclass, field

from ..spool.cluster import CANCEL_CHANNEL, OUTCOMES_CHANNEL, TASKS_CHANNEL, Wakeups
from ..spool.files import Spool
from ..spool.watcher import OUTCOME_MASK, OVERFLOW, PENDING_MASK, Watcher


@dataclass
class Events:
    """What one wait brought. `flags`: "recheck" (the listener (re)connected: look once at
    everything), "outcomes" (this host's tasks finished in the cluster), "tasks:CRAFTSMAN" (a
    cluster task of that craftsman waits), "cancel" (a task this host holds a lease of was
    cancelled on its origin); the bridge adds "served" and "freed" itself."""

    names: set[str] = field(default_factory=set)  # pending names that came
    outcomes: bool = False  # an outcome landed in completed/ or failed/
    failed: set[str] = field(default_factory=set)  # the names that landed in failed/
    rescan: bool = False  # pending/ must be read whole (inotify overflowed)
    flags: set[str] = field(default_factory=set)


class BridgeWakeups:
    """The bridge's wake-ups: `wait` blocks until something happened or the timeout."""

    def __init__(self, spool: Spool, dsn: str, host: str) -> None:
        self.spool = spool
        self.dsn = dsn
        self.host = host
        self.stopping = False
        self._watcher = Watcher()
        for directory, mask in ((spool.pending, PENDING_MASK), (spool.completed, OUTCOME_MASK),
                                (spool.failed, OUTCOME_MASK)):
            self._watcher.watch(directory, mask)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._flags: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the listener thread (a daemon: it ends with the process)."""
        threading.Thread(target=self._listen, name="cluster-wakeups", daemon=True).start()

    def stop(self) -> None:
        """Wake the loop to stop; safe in a signal handler (a flag and a write)."""
        self.stopping = True
        os.write(self._wake_w, b"s")

    def wait(self, timeout: float) -> Events:
        """Block until an event, a stop or the timeout; what came."""
        ready, _, _ = select.select([self._watcher.fileno(), self._wake_r], [], [],
                                    max(0.0, timeout))
        events = self._local_events(ready)
        events.flags = self._take_flags(ready)
        return events

    def close(self) -> None:
        """Stop watching the directories (the listener thread dies with the process)."""
        self._watcher.close()

    def _local_events(self, ready: list) -> Events:
        events = Events()
        if self._watcher.fileno() not in ready:
            return events
        for directory, name, _ in self._watcher.events():
            if name == OVERFLOW:
                events.rescan = events.outcomes = True
            elif directory == self.spool.pending:
                events.names.add(name)
            else:
                events.outcomes = True
                if directory == self.spool.failed:
                    events.failed.add(name)
        return events

    def _take_flags(self, ready: list) -> set[str]:
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        with self._lock:
            flags, self._flags = self._flags, set()
        return flags

    def _listen(self) -> None:
        """The listener thread: NOTIFY and reconnects become flags and a byte on the pipe."""
        wakeups = Wakeups(self.dsn)
        while not self.stopping:
            wake = wakeups.wait(None)
            flags = {"recheck"} if wake.recheck else set()
            for channel, payload in wake.notices:
                if channel == TASKS_CHANNEL:
                    flags.add(f"tasks:{payload}")
                elif channel == OUTCOMES_CHANNEL and payload == self.host:
                    flags.add("outcomes")
                elif channel == CANCEL_CHANNEL and payload == self.host:
                    flags.add("cancel")
            if flags:
                with self._lock:
                    self._flags |= flags
                os.write(self._wake_w, b"w")
