"""`koubou top`: a live terminal view that redraws on inotify events, never on a timer.

Spool renames wake it; so do worker heartbeats, which touch run/workers/<id>.lock (IN_ATTRIB).
Bursts of events are coalesced into at most one redraw per `min_interval` seconds.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from inotify_simple import flags

from .render import seconds, table, usd
from ..spool.files import STATES, Spool
from ..spool.watcher import Watcher

SPOOL_MASK = (flags.CREATE | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO
              | flags.CLOSE_WRITE)
WORKERS_MASK = SPOOL_MASK | flags.ATTRIB | flags.MODIFY
CLEAR = "\x1b[H\x1b[2J"


def frame(home: Path, queues: dict[str, int], workers: list[dict[str, Any]],
          in_flight: dict[str, int], budget: dict[str, Any], now: float) -> list[str]:
    """One screen of the live view: queues, workers, craftsmen in flight, spend."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now))
    lines = [f"koubou top  {home}  {stamp}  (q quits)", "",
             "  ".join(f"{state} {count}" for state, count in queues.items()), ""]
    lines += table(["worker", "liveness", "heartbeat", "in flight", "done", "failed", "craftsmen"],
                   [[w["id"], w.get("liveness", "?"), seconds(w.get("heartbeat_age_s")),
                     w.get("in_flight", "-"), w.get("done", "-"), w.get("failed", "-"),
                     ",".join(w.get("craftsmen") or []) or "all"] for w in workers])
    if in_flight:
        lines += [""] + table(["craftsman", "in flight"], [[k, v] for k, v in in_flight.items()])
    daily, monthly = budget["daily"], budget["monthly"]
    lines += ["", f"spend today {usd(daily['used_usd'])} (left {usd(daily['left_usd'])})  "
                  f"month {usd(monthly['used_usd'])} (left {usd(monthly['left_usd'])})"]
    return lines


def watch_spool(spool: Spool) -> Watcher:
    """inotify watches on the state directories and the workers' lock files."""
    return spool.watch(STATES, SPOOL_MASK, workers=WORKERS_MASK)


@contextmanager
def keys(stream: TextIO) -> Iterator[int | None]:
    """Single key presses from a terminal (cbreak mode, so Ctrl-C still interrupts)."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(spool: Spool, draw: Callable[[], list[str]], out: TextIO = sys.stdout,
        keyboard: TextIO = sys.stdin, min_interval: float = 0.25) -> None:
    """Redraw on spool events until q is pressed or Ctrl-C; returns when the user quits."""
    watcher = watch_spool(spool)
    try:
        with keys(keyboard) as key_fd:
            _loop(watcher, key_fd, lambda: _show(out, draw()), min_interval)
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()


def _show(out: TextIO, lines: list[str]) -> None:
    out.write(CLEAR + "\n".join(lines) + "\n")
    out.flush()


def _loop(watcher: Watcher, key_fd: int | None, redraw: Callable[[], None],
          min_interval: float) -> None:
    redraw()
    last, dirty = time.monotonic(), False
    sources = [watcher.fileno()] + ([key_fd] if key_fd is not None else [])
    while True:
        # Block without a timeout unless a redraw is owed: then only until it is due.
        timeout = max(last + min_interval - time.monotonic(), 0) if dirty else None
        ready, _, _ = select.select(sources, [], [], timeout)
        if key_fd is not None and key_fd in ready and os.read(key_fd, 1) in (b"q", b"Q"):
            return
        if watcher.fileno() in ready:
            list(watcher.events())  # only a wake-up: the frame re-reads the directories
            dirty = True
        if dirty and time.monotonic() - last >= min_interval:
            redraw()
            last, dirty = time.monotonic(), False
