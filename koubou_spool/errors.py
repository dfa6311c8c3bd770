"""One exception base for the whole package; the CLI maps each kind to an exit code (README: Commands)."""

from __future__ import annotations

from collections.abc import Sequence

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_UNUSABLE = 4


class KoubouError(Exception):
    """Base of every error koubou raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = EXIT_UNUSABLE


class InvalidTask(KoubouError, ValueError):
    """Input that is not a valid task (README: Tasks)."""

    exit_code = EXIT_USAGE


class UsageError(KoubouError, ValueError):
    """A command was asked for something it cannot do as asked."""

    exit_code = EXIT_USAGE


class ConfigError(KoubouError, ValueError):
    """The configuration file is missing, unreadable or wrong. `problems` holds every fault
    found, one sentence each (the message leads with the first); `warnings` the unknown keys,
    which often explain them (`bakend: echo`)."""

    exit_code = EXIT_UNUSABLE

    def __init__(self, message: str, problems: Sequence[str] = (),
                 warnings: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]
        self.warnings = list(warnings)


class SpoolError(KoubouError, OSError):
    """The spool directories are missing or unusable."""

    exit_code = EXIT_UNUSABLE


class TaskNotFound(KoubouError, LookupError):
    """No task with that id or file name is in the spool."""

    exit_code = EXIT_USAGE


class WaitTimeout(KoubouError, TimeoutError):
    """Waiting for a task ran out of time; the task stays queued."""

    exit_code = EXIT_TIMEOUT


# Kept here rather than in spool/cluster.py, so that code which only catches them (the
# budget) never imports psycopg, an optional dependency (the `cluster` extra).
class ClusterUnavailable(KoubouError, ConnectionError):
    """PostgreSQL cannot be reached (down, restarting, cut off): local work goes on."""


class ClusterSchemaError(KoubouError, RuntimeError):
    """The database holds a schema this koubou does not know (a newer koubou made it)."""
