"""The hosts of a cluster as any host sees them (docs/CLUSTER.md, "What every host shows").

Each host's bridge replaces its one row of `cluster_hosts` (migration 0003_hosts) at each
heartbeat with a snapshot of its home: queue depths, live workers, the day's and the month's
usage per craftsman from its ledger; and its rows of `cluster_usage` (migration 0009_usage):
the figures of each of its days and months, which a report of an earlier period reads.
`koubou status`, `workers`, `list`, `report` and the dashboard of any host read these rows,
and the cluster's tasks of other origins from `cluster_tasks`.

A `Board` is one connection of its own, with a short connect timeout and a statement timeout:
a person's command never hangs on a database that is away; it says so and shows its home.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from ..errors import ClusterSchemaError
from . import task as task_format
from .cluster import BUDGET_ROW, KEEPALIVES, SPENT, close_quietly, unavailable

READ_TIMEOUT_S = 2  # connect, for a command a person waits on
STATEMENT_TIMEOUT_MS = 5000

# The host's row, and the figures of the periods given (its days and months) in cluster_usage.
PUBLISH = """
    WITH beat AS (
        INSERT INTO cluster_hosts (host, heartbeat_at, snapshot)
        VALUES (%(host)s, now(), %(snapshot)s)
        ON CONFLICT (host) DO UPDATE SET heartbeat_at = now(), snapshot = excluded.snapshot)
    INSERT INTO cluster_usage (host, period, figures)
    SELECT %(host)s, period, figures
    FROM unnest(%(periods)s::text[], %(figures)s::jsonb[]) AS u(period, figures)
    ON CONFLICT (host, period) DO UPDATE SET figures = excluded.figures, written_at = now()"""

USAGE = """
    SELECT host, figures, extract(epoch FROM now() - written_at)::float8 FROM cluster_usage
    WHERE period = %(period)s ORDER BY host"""

HOSTS = """
    SELECT host, extract(epoch FROM now() - heartbeat_at)::float8, snapshot
    FROM cluster_hosts ORDER BY host"""

# Newest first by the time of the task's last change (finished, else submitted), as a file's
# time orders `koubou list` of the home; the index cluster_tasks_recent serves the order.
TASKS = """
    SELECT id, state, origin, host, craftsman, attempt,
        extract(epoch FROM coalesce(finished_at, submitted_at))::float8
    FROM cluster_tasks
    WHERE origin <> %(origin)s AND state = ANY(%(states)s::text[])
    ORDER BY coalesce(finished_at, submitted_at) DESC LIMIT %(limit)s"""

TASK = """
    SELECT id, state, origin, host, craftsman, attempt, worker_id, outcome, body,
        extract(epoch FROM submitted_at)::float8, extract(epoch FROM finished_at)::float8
    FROM cluster_tasks WHERE id = %(id)s"""

# A host that left for good: its row goes, once it is older than the host's own lease (as the
# views judge a row stale) and no lease of the host is still running. Its tasks stay: those it
# submitted are delivered if it comes back. One statement, so a host that beats meanwhile keeps
# its row: the DELETE sees its new heartbeat.
FORGET = """
    WITH gone AS (
        DELETE FROM cluster_hosts WHERE host = %(host)s
            AND now() - heartbeat_at > make_interval(
                secs => coalesce((snapshot->>'stale_after_s')::float8, 60))
            AND NOT EXISTS (SELECT 1 FROM cluster_tasks WHERE host = %(host)s
                            AND state = 'in_progress' AND lease_until > now())
        RETURNING host)
    SELECT (SELECT count(*) FROM gone),
        (SELECT extract(epoch FROM now() - heartbeat_at)::float8 FROM cluster_hosts
         WHERE host = %(host)s),
        (SELECT coalesce((snapshot->>'stale_after_s')::float8, 60) FROM cluster_hosts
         WHERE host = %(host)s),
        (SELECT count(*) FROM cluster_tasks WHERE host = %(host)s AND state = 'in_progress'
            AND lease_until > now()),
        (SELECT count(*) FROM cluster_tasks WHERE origin = %(host)s
            AND state IN ('pending', 'in_progress'))
        + (SELECT count(*) FROM cluster_tasks WHERE origin = %(host)s
            AND state IN ('completed', 'failed') AND delivered_at IS NULL)"""


class Board:
    """One connection to the cluster for showing it: opened on first use, again after a loss."""

    def __init__(self, dsn: str, *, connect_timeout: float = READ_TIMEOUT_S) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection | None = None

    def publish(self, host: str, snapshot: dict[str, Any],
                periods: dict[str, list[dict[str, Any]]] | None = None) -> None:
        """Replace this host's row with a snapshot of its home, dated on the database's clock,
        and its figures of these periods (by label: a day, a month) in one statement."""
        given = periods or {}
        self._rows(PUBLISH, {"host": host, "snapshot": Jsonb(snapshot),
                             "periods": list(given),
                             "figures": [Jsonb(figures) for figures in given.values()]})

    def usage(self, period: str) -> list[dict[str, Any]]:
        """What each host wrote of a period (a day or month label of its budget.timezone):
        its `figures` per craftsman, `age_s` since it wrote them. None written by a cluster
        of an older schema."""
        try:
            rows = self._rows(USAGE, {"period": period})
        except ClusterSchemaError:
            return []
        return [{"host": host, "figures": figures, "age_s": max(age, 0.0)}
                for host, figures, age in rows]

    def hosts(self) -> list[dict[str, Any]]:
        """Every host's row: its name, the age of the row in seconds, its snapshot."""
        return [{"host": host, "age_s": max(age, 0.0), "snapshot": snapshot}
                for host, age, snapshot in self._rows(HOSTS, {})]

    def forget(self, host: str) -> dict[str, Any]:
        """Remove the row of a host that left for good; what was found: `forgotten`, the row's
        `age_s` and `stale_after_s` (None: no such row), the host's live `leases`, and the
        `open` tasks it submitted (not finished, or not delivered to it)."""
        [(gone, age, stale_after, leases, still_open)] = self._rows(FORGET, {"host": host})
        return {"forgotten": bool(gone), "age_s": age, "stale_after_s": stale_after,
                "leases": leases, "open": still_open}

    def tasks(self, *, origin: str, states: Sequence[str], limit: int) -> list[dict[str, Any]]:
        """The cluster's tasks submitted on other hosts than `origin`, newest first."""
        rows = self._rows(TASKS, {"origin": origin, "states": list(states), "limit": limit})
        return [{"id": task_id, "state": state, "origin": where, "host": ran_on,
                 "craftsman": craftsman, "attempt": attempt, "at": at}
                for task_id, state, where, ran_on, craftsman, attempt, at in rows]

    def task(self, task_id: str) -> dict[str, Any] | None:
        """One cluster task by id: its row, the task as submitted (`body`), its outcome once
        finished; None when not there."""
        rows = self._rows(TASK, {"id": task_id})
        if not rows:
            return None
        keys = ("id", "state", "origin", "host", "craftsman", "attempt", "worker_id", "outcome",
                "body", "submitted_at", "finished_at")
        found = dict(zip(keys, rows[0], strict=True))
        return found | {"body": task_format.decode(bytes(found["body"]))}

    def spent(self, day: str, month: str) -> tuple[float, float]:
        """The cluster's budget figures for this day and month: spent, and reserved by the
        calls in flight, on every host (what each worker checks its limits against)."""
        rows = self._rows(SPENT, {"day": day, "month": month, "scope": BUDGET_ROW})
        return (float(rows[0][0]), float(rows[0][1])) if rows else (0.0, 0.0)

    def close(self) -> None:
        """Close the connection, whatever state it is in."""
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def _rows(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        try:
            cursor = self._conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
        except psycopg.errors.UndefinedTable:
            raise ClusterSchemaError("the cluster's database has no hosts table yet: start "
                                     "`koubou cluster` on a host of this koubou (it migrates)"
                                     ) from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.close()
            raise unavailable(exc) from None

    def _connect(self) -> psycopg.Connection:
        try:
            return psycopg.connect(self.dsn, autocommit=True,
                                   connect_timeout=max(1, round(self.connect_timeout)),
                                   options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                                   **KEEPALIVES)
        except psycopg.OperationalError as exc:
            raise unavailable(exc) from None

