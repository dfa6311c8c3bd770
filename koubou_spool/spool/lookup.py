"""Lookups in the file spool: where a task is, its outcome, the entries of a state."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import task as task_format
from ..errors import TaskNotFound
from .entries import CLAIM_RE, SIDECAR, STATES, Found, Refused, Unavailable, _entry_name
from .watcher import Watcher, wait_for_files


class Lookups:
    """The read-only half of the file spool (spool.files.Spool), over its state directories."""

    def names(self, state: str) -> list[str]:
        """Entries of one state directory, without sidecars, dot files or finishing markers."""
        directory = self.state_dir(state)
        return [n for n in os.listdir(directory)
                if not n.startswith(".") and not n.endswith(SIDECAR) and not n.endswith(".fin")]

    def entries(self, states: Iterable[str]) -> list[tuple[float, str, str, bool]]:
        """(time, state, name, rejected) of each entry of these states: the time its file was
        last changed, and whether it is rejected input (in failed/, with a reason beside it)."""
        found = []
        for state in states:
            directory = self.state_dir(state)
            for name in self.names(state):
                try:
                    mtime = os.lstat(f"{directory}/{name}").st_mtime
                except FileNotFoundError:
                    continue
                rejected = state == "failed" and os.path.lexists(f"{directory}/{name}{SIDECAR}")
                found.append((mtime, state, name, rejected))
        return found

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

    def counts(self) -> dict[str, int]:
        """Number of entries in each state (as `names` lists them)."""
        return {state: len(self.names(state)) for state in STATES}

    def outcome_states(self, names: Iterable[str]) -> dict[str, str]:
        """'completed' or 'failed' for each of these entry names that has a file there."""
        found = {}
        for name in names:
            for state, directory in (("completed", self.completed), ("failed", self.failed)):
                if os.path.lexists(f"{directory}/{name}"):
                    found[name] = state
                    break
        return found

    def wait_for_outcomes(self, names: set[str], timeout: float | None) -> set[str]:
        """Block (on inotify) until each entry name is in completed/ or failed/, or timeout;
        the names found, durable (sync_outcomes) before they are returned."""
        found = wait_for_files([self.completed, self.failed], names, timeout)
        if found:
            self.sync_outcomes()
        return found

    def sync_outcomes(self) -> None:
        """fsync completed/ and failed/ (with spool.fsync on): an outcome seen there is then
        durable. The rename that placed it is visible before its worker's fsync (the group
        commit's round) has run; a waiter that acts on it makes sure first, and an fsync that
        finds the rename committed costs little."""
        self.sync_dir(self.completed)
        self.sync_dir(self.failed)

    def watch(self, states: Iterable[str], mask: int, *, workers: int = 0) -> Watcher:
        """A change feed on these states (and, with a `workers` mask, the worker registrations):
        inotify on their directories. Watch first, then look, so nothing changed in between
        is missed; events() yields (the state's directory, name, mask)."""
        watcher = Watcher()
        for state in states:
            watcher.watch(self.state_dir(state), mask)
        if workers:
            watcher.watch(self.workers, workers)
        return watcher
