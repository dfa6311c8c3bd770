"""The Huey peer: SqliteHuey with a no-op task; `huey_consumer huey_app.huey` runs it.

The consumer side builds `huey` from HUEY_DB and HUEY_LOG. Each execution appends the task id to
the log once its result is stored (SIGNAL_COMPLETE comes after put_result), so the log is both
the "result persisted" clock and the count of executions.
"""

from __future__ import annotations

import os

from huey import SqliteHuey, signals


def build(db: str, log: str) -> tuple[SqliteHuey, object]:
    """A SqliteHuey on `db` (default settings) and its no-op task, which returns its id."""
    app = SqliteHuey("bench", filename=db)

    @app.task()
    def noop(task_id: str) -> str:
        return task_id  # returned, so Huey persists a result as every system here does

    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @app.signal(signals.SIGNAL_COMPLETE)
    def record(signal: str, task: object, *args: object) -> None:
        os.write(log_fd, f"{task.args[0]}\n".encode())

    return app, noop


if "HUEY_DB" in os.environ:
    huey, noop = build(os.environ["HUEY_DB"], os.environ["HUEY_LOG"])
