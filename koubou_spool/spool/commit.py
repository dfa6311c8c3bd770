"""Group commit: outcomes that finish close together share their fsyncs (README: How it keeps
its promises, Durable by default).

An outcome is durable once its file and the directory it was renamed into are fsynced. One fsync
of a directory covers every rename made in it before the call, as a database's group commit
covers every log record before it; so while one round of fsyncs runs, the outcomes that come in
wait for the next round and share it. Rounds run in a thread of their own, so the worker's loop
goes on claiming and calling craftsmen while the disk works. Each outcome is handed back to the
loop (`done`) only after the round that made it durable: nothing reports it before.

The thread is woken when the worker's loop runs out of work (IdleAwareLoop): by then the loop
has claimed the next task and sent its request, which would otherwise contend with the round for
the GIL and the CPU (on a real engine, one request at a time, the request's p50 went from 10.5
to 9.3 ms with it: bench/FINDINGS.md, seventh look).

With `spool.fsync: false` there is nothing to share: each outcome is written at once, in the
caller's thread, and handed back before `add` returns.
"""

from __future__ import annotations

import asyncio
import logging
import selectors
import threading
from collections.abc import Callable

from .entries import Outcome
from .files import Spool

log = logging.getLogger(__name__)

Done = Callable[[Outcome], None]


class IdleSelector(selectors.DefaultSelector):
    """A selector that first runs what waits for its loop to be idle: asyncio selects with a
    timeout of 0 while callbacks are ready, so a wait that may block comes only once the loop
    has run everything it had."""

    def __init__(self) -> None:
        super().__init__()
        self.idle: list[Callable[[], None]] = []

    def select(self, timeout: float | None = None) -> list:
        if self.idle and (timeout is None or timeout > 0):
            callbacks, self.idle = self.idle, []
            for callback in callbacks:
                callback()
        return super().select(timeout)


class IdleAwareLoop(asyncio.SelectorEventLoop):
    """An event loop that can run a callback once it has nothing else to run (for
    asyncio.Runner's loop_factory)."""

    def __init__(self) -> None:
        self._idle_selector = IdleSelector()
        super().__init__(self._idle_selector)

    def call_when_idle(self, callback: Callable[[], None]) -> None:
        """Run `callback` (once, on the loop) before the loop next waits for events."""
        self._idle_selector.idle.append(callback)


class GroupCommit:
    """Writes outcomes in rounds, one thread, for the callers on one asyncio loop."""

    def __init__(self, spool: Spool, loop: asyncio.AbstractEventLoop) -> None:
        self.spool = spool
        self.loop = loop
        # The thread's wake-up: once the loop is idle, or else at its next iteration.
        self._later = getattr(loop, "call_when_idle", loop.call_soon)
        self.pending = 0  # outcomes added and not handed back yet (counted on the loop)
        self._queued: list[tuple[Outcome, Done]] = []
        self._ready = threading.Condition()
        self._closing = False
        self._kicked = False
        self._thread: threading.Thread | None = None

    def add(self, outcome: Outcome, done: Done) -> None:
        """Write a fenced outcome; `done(outcome)` runs on the loop once it is durable (or its
        write failed: see Outcome)."""
        if not self.spool.fsync:
            self.spool.write_outcomes([outcome])
            done(outcome)
            return
        self.pending += 1
        with self._ready:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="commit", daemon=True)
                self._thread.start()
            self._queued.append((outcome, done))
        if not self._kicked:
            # The thread is woken once the loop has nothing left to run: the outcomes of this
            # burst go in one round, and the request the loop sends next goes first.
            self._kicked = True
            self._later(self._kick)

    def _kick(self) -> None:
        self._kicked = False
        with self._ready:
            self._ready.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Finish the rounds queued, then stop the thread."""
        with self._ready:
            self._closing = True
            self._ready.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[tuple[Outcome, Done]] | None:
        """Everything queued since the last round, waiting for some; None once closing."""
        with self._ready:
            while not self._queued and not self._closing:
                self._ready.wait()
            batch, self._queued = self._queued, []
            return batch or None

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            try:
                self.spool.write_outcomes([outcome for outcome, _ in batch])
            except Exception as exc:  # a bug must not leave outcomes waiting forever
                log.exception("group commit of %d outcomes failed", len(batch))
                for outcome, _ in batch:
                    if not outcome.placed and outcome.error is None:
                        outcome.error = OSError(f"the outcome could not be written: {exc}")
            self.loop.call_soon_threadsafe(self._hand_back, batch)

    def _hand_back(self, batch: list[tuple[Outcome, Done]]) -> None:
        """On the loop: each outcome of a finished round to its caller."""
        for outcome, done in batch:
            self.pending -= 1
            try:
                done(outcome)
            except Exception:  # one caller's bug must not strand the others of its round
                log.exception("reporting the outcome of %s failed", outcome.task_id)
