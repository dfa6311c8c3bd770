"""The cluster queue: tasks that cross hosts, in one PostgreSQL database (docs/CLUSTER.md).

Every PostgreSQL statement of koubou lives in this module and in cluster_batch.py (those of a
task's path, each for many tasks at once), as every SQLite one lives in ledger.py. Each
operation is one statement, hence one transaction, on an autocommit connection:

- claim: `FOR UPDATE SKIP LOCKED` on the best pending rows of the craftsmen a worker serves;
  the attempt number rises by one and the lease runs on the database's clock, never a host's;
- publish and requeue: fenced by (id, attempt) while in progress, so a revoked lease changes
  nothing; wake-ups are sent by pg_notify inside the same transaction, so only for what committed;
- the budget: one conditional UPDATE of the cluster's budget row (READ COMMITTED re-checks its
  WHERE against the committed row when it waited for another reservation).

Connection loss is ClusterUnavailable: the caller's local work goes on, and it asks again later.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.types.json import Jsonb

from ..errors import ClusterSchemaError, ClusterUnavailable
from . import cluster_batch as batch, task as task_format
from .task import Task

log = logging.getLogger(__name__)

TASKS_CHANNEL = "koubou_tasks"  # payload: the craftsman a task waits for
OUTCOMES_CHANNEL = "koubou_outcomes"  # payload: the origin host of a finished task
CANCEL_CHANNEL = "koubou_cancel"  # payload: the host holding the lease of a cancelled task
CHANNELS = (TASKS_CHANNEL, OUTCOMES_CHANNEL, CANCEL_CHANNEL)

# A task cancelled on its origin ends in the cluster with the origin's outcome, delivered there
# already: no host claims it again, a lease of it is revoked (its renewal matches no row), and
# the late result of that lease is fenced out. The host that held it last is told at once (a
# pending task's last holder too, if it had one: it finds nothing of it to stop).
CANCEL = """
    WITH gone AS (
        UPDATE cluster_tasks SET state = 'failed', outcome = %(outcome)s, finished_at = now(),
            delivered_at = now(), lease_until = NULL
        WHERE origin = %(origin)s AND id = %(id)s AND state IN ('pending', 'in_progress')
        RETURNING host)
    SELECT CASE WHEN host IS NOT NULL THEN pg_notify(%(channel)s, host) END FROM gone"""
# A forwarded task past its expires_at that no host has started fails there as expired, its
# outcome delivered to its origin as any other (PRODUCT.md §3: not started by expires_at).
EXPIRE = """
    UPDATE cluster_tasks SET state = 'failed', outcome = %(outcome)s, finished_at = now(),
        lease_until = NULL
    WHERE origin = %(origin)s AND id = %(id)s AND state = 'pending'"""


def holds_nul(value: Any) -> bool:
    """Whether a JSON value holds U+0000 in a string or a key. PostgreSQL's jsonb cannot
    store one (no text value can): a task holding one does not cross hosts (spool/bridge.py)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(holds_nul(key) or holds_nul(item) for key, item in value.items())
    if isinstance(value, list):
        return any(holds_nul(item) for item in value)
    return False


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


def outcome_json(record: dict[str, Any]) -> Jsonb:
    """An outcome record as the database keeps it. A U+0000 in it (a CLI agent's output may
    hold one) crosses as U+FFFD: jsonb refuses the character, and a refused statement would
    leave the outcome with no way home."""
    if holds_nul(record):
        log.warning("the outcome of %s holds U+0000, which PostgreSQL cannot store: it crosses "
                    "with U+FFFD in its place", record.get("id"))
        record = _without_nul(record)
    return Jsonb(record)


MIGRATION_LOCK = 0x6B6F75626F75  # "koubou": the advisory lock first connects migrate under
CONNECT_TIMEOUT_S = 5
# A cut-off host sees no FIN: keepalives end an idle connection in about 11 s, not 2 hours, and
# tcp_user_timeout one whose request goes unanswered as soon, not after 15 minutes of
# retransmissions (keepalives do not probe a connection with data in flight).
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
              "keepalives_count": 3, "tcp_user_timeout": 11_000}
BACKOFF_S = (0.1, 5.0)  # reconnecting: from, doubling up to
BUDGET_ROW = "cluster"
RATE_RETRY_S = 0.05  # the shortest wait a full rate window asks for

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_tasks_and_budget", """
        CREATE TABLE cluster_tasks (
            id text PRIMARY KEY,
            seq bigserial NOT NULL,
            origin text NOT NULL,
            craftsman text NOT NULL,
            priority integer NOT NULL,
            state text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'in_progress', 'completed', 'failed')),
            attempt integer NOT NULL DEFAULT 0,
            max_attempts integer NOT NULL,
            not_before timestamptz,
            body bytea NOT NULL,
            worker_id text,
            host text,
            submitted_at timestamptz NOT NULL DEFAULT now(),
            claimed_at timestamptz,
            lease_until timestamptz,
            finished_at timestamptz,
            outcome jsonb,
            delivered_at timestamptz);
        CREATE INDEX cluster_tasks_ready ON cluster_tasks (craftsman, priority DESC, seq)
            WHERE state = 'pending';
        CREATE INDEX cluster_tasks_leases ON cluster_tasks (lease_until)
            WHERE state = 'in_progress';
        CREATE INDEX cluster_tasks_undelivered ON cluster_tasks (origin, finished_at)
            WHERE state IN ('completed', 'failed') AND delivered_at IS NULL;
        CREATE TABLE cluster_workers (
            id text PRIMARY KEY, host text NOT NULL, pid integer, craftsmen text[],
            started_at timestamptz NOT NULL DEFAULT now(),
            heartbeat_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE cluster_budget (
            scope text PRIMARY KEY, day text NOT NULL, day_usd numeric NOT NULL,
            month text NOT NULL, month_usd numeric NOT NULL);
        INSERT INTO cluster_budget VALUES ('cluster', '', 0, '', 0);
        CREATE TABLE cluster_reservations (
            id bigserial PRIMARY KEY, task_id text, attempt integer, craftsman text, host text,
            day text NOT NULL, month text NOT NULL, reserved_usd numeric NOT NULL,
            cost_usd numeric, settled boolean NOT NULL DEFAULT false,
            at timestamptz NOT NULL DEFAULT now());
        CREATE INDEX cluster_reservations_open ON cluster_reservations (task_id)
            WHERE NOT settled;
    """),
    ("0002_limits", """
        -- One row per craftsman: its requests of the last minute as [epoch seconds, tokens],
        -- so that a check-and-count is one conditional UPDATE of that row (READ COMMITTED
        -- re-checks its WHERE against the row another host committed meanwhile).
        CREATE TABLE cluster_windows (
            craftsman text PRIMARY KEY, requests jsonb NOT NULL DEFAULT '[]');
        CREATE FUNCTION koubou_recent(requests jsonb, since float8) RETURNS jsonb
            LANGUAGE sql IMMUTABLE AS
            $$ SELECT jsonb_path_query_array(requests, 'strict $[*] ? (@[0] > $s)',
                                             jsonb_build_object('s', since)) $$;
        CREATE FUNCTION koubou_tokens(requests jsonb) RETURNS bigint LANGUAGE sql IMMUTABLE AS
            $$ SELECT coalesce(sum((e->>1)::bigint), 0) FROM jsonb_array_elements(requests) e $$;
    """),
    ("0003_hosts", """
        -- One row per host, replaced whole by its bridge at each heartbeat: what `koubou
        -- status`, `workers`, `report` and the dashboard of any host show of it
        -- (spool/cluster_hosts.py). The age of a row is on the database's clock.
        CREATE TABLE cluster_hosts (
            host text PRIMARY KEY, heartbeat_at timestamptz NOT NULL DEFAULT now(),
            snapshot jsonb NOT NULL);
        -- `koubou list` of other hosts' tasks, newest first, stops at its limit.
        CREATE INDEX cluster_tasks_recent ON cluster_tasks
            ((coalesce(finished_at, submitted_at)) DESC);
    """),
    ("0004_alerts", """
        -- Each budget threshold alerts once per period for the whole cluster: the host whose
        -- insert lands runs its alert_command, the others see the row there already.
        CREATE TABLE cluster_alerts (
            period text NOT NULL, percent integer NOT NULL, host text NOT NULL,
            spent_usd numeric NOT NULL, limit_usd numeric NOT NULL,
            at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (period, percent));
    """),
    ("0005_runs", """
        -- A task retried on its origin starts a new run of its row. A host that holds the
        -- outcome of an older run runs it again rather than send that outcome back
        -- (spool/bridge.py, take_in).
        ALTER TABLE cluster_tasks ADD COLUMN run integer NOT NULL DEFAULT 0;
    """),
    ("0006_expires", """
        -- A task's expires_at, for the take-back of a lease that ran out after it: the task
        -- then fails as expired there and then, whether or not a host serves it still.
        ALTER TABLE cluster_tasks ADD COLUMN expires_at timestamptz;
    """),
    ("0007_open_by_origin", """
        -- An origin's open tasks: what its bridge's rescan, `--forget` and the bringing home
        -- of tasks look up, without reading every row the cluster has kept.
        CREATE INDEX cluster_tasks_open ON cluster_tasks (origin)
            WHERE state IN ('pending', 'in_progress');
    """),
    ("0008_fences", """
        -- The attempt and run of each row taken out of the cluster (purged, or brought home):
        -- the same id forwarded again goes on counting from them, so that a lease of the row
        -- that was, and an outcome of its run still on another host, stay fenced out.
        CREATE TABLE cluster_fences (
            id text PRIMARY KEY, attempt integer NOT NULL, run integer NOT NULL,
            at timestamptz NOT NULL DEFAULT now());
        -- The max_attempts a run was forwarded with, for the attempts it spent when it comes
        -- home (NULL in rows of before: the bringing home's own allowance stands for it).
        ALTER TABLE cluster_tasks ADD COLUMN granted integer;
    """),
    ("0009_usage", """
        -- Each host's figures of each of its days and months (labels of its budget.timezone),
        -- written by its bridge: what a report of an earlier period shows of the hosts.
        CREATE TABLE cluster_usage (
            host text NOT NULL, period text NOT NULL, figures jsonb NOT NULL,
            written_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (host, period));
    """),
    ("0010_adoptions", """
        -- The older run a host had still pending or running when it took the task in under
        -- this run, and that host: the outcome of that older run there is this run's to send
        -- back, not one to run again (spool/bridge.py, take_in). A new run forgets it.
        ALTER TABLE cluster_tasks ADD COLUMN adopted_run integer, ADD COLUMN adopted_host text;
    """),
    ("0011_nul_bodies", r"""
        -- Unfinished rows an older koubou forwarded with U+0000 in their task (its JSON escape
        -- behind an even number of backslashes): jsonb cannot hold the character, so every
        -- statement casting such a body (the take-back of expired leases) failed, on every
        -- host. They fail as the forward now refuses them, the character as U+FFFD in the
        -- outcome that goes home.
        UPDATE cluster_tasks t SET
            state = 'failed', finished_at = now(), worker_id = NULL, lease_until = NULL,
            outcome = replace(convert_from(t.body, 'UTF8'), '\u0000', '\ufffd')::jsonb
                || jsonb_build_object('status', 'failed', 'error', jsonb_build_object(
                    'kind', 'invalid', 'attempts', t.attempt,
                    'at', to_char(now() AT TIME ZONE 'UTC',
                                  'YYYY-MM-DD"T"HH24:MI:SS.MS"+00:00"'),
                    'message', 'it holds the character U+0000, which the cluster''s database '
                        || 'cannot store, so it cannot cross hosts: remove it, or serve '
                        || 'craftsman ' || t.craftsman || ' on its host'))
        WHERE t.state IN ('pending', 'in_progress')
            AND convert_from(t.body, 'UTF8') ~ '(^|[^\\])(\\\\)*\\u0000';
    """),
]
SCHEMA_VERSION = len(MIGRATIONS)


class Submission(NamedTuple):
    """A task leaving its host: the craftsman it was routed to, the attempts it may use."""

    task: Task
    craftsman: str
    max_attempts: int = 3
    delivered_run: int | None = None  # a retried task: the run whose outcome it was given


@dataclass(frozen=True)
class ClusterClaim:
    """A lease on one task: `attempt` is the fencing token; `run` counts the task's retries on
    its origin."""

    task_id: str
    attempt: int
    worker_id: str
    craftsman: str
    origin: str
    body: bytes
    max_attempts: int
    run: int = 0
    adopted: int | None = None  # the older run this host adopted under this run, if any


@dataclass(frozen=True)
class Delivery:
    """A finished task waiting to be written into its origin host's spool."""

    task_id: str
    state: str
    outcome: dict[str, Any]
    attempt: int
    run: int = 0
    host: str | None = None  # the host that held its last lease; None if none ever did


# --- connections and the schema ------------------------------------------------------------

def connect(dsn: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A connection with a bounded connect time and keepalives; ClusterUnavailable if none."""
    try:
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT_S,
                               **KEEPALIVES)
    except psycopg.OperationalError as exc:
        raise unavailable(exc) from None


def unavailable(exc: Exception) -> ClusterUnavailable:
    """The error a lost or refused connection becomes: one sentence, the server's reason."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ClusterUnavailable(f"the cluster's PostgreSQL cannot be reached ({reason}); local "
                              "work goes on, cross-host tasks wait until it is back")


def close_quietly(conn: psycopg.Connection | None) -> None:
    """Close a connection that may have failed already: its error says nothing more."""
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error as exc:
            log.debug("closing a failed connection: %s", exc)


def migrate(conn: psycopg.Connection) -> list[str]:
    """Apply the migrations not yet recorded, each in its own transaction, under an advisory
    lock so that hosts connecting for the first time together apply each once; their names."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS cluster_migrations "
                     "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row[0] for row in conn.execute("SELECT name FROM cluster_migrations")}
        unknown = done - {name for name, _ in MIGRATIONS}
        if unknown:
            raise ClusterSchemaError(
                f"the cluster database has migrations this koubou does not know "
                f"({', '.join(sorted(unknown))}): upgrade koubou on this host")
        applied = []
        for name, script in MIGRATIONS:
            if name in done:
                continue
            with conn.transaction():
                conn.execute(script)
                conn.execute("INSERT INTO cluster_migrations (name) VALUES (%s)", (name,))
            applied.append(name)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def schema_version(conn: psycopg.Connection) -> int:
    """How many of the migrations the database holds (0: none yet)."""
    exists = conn.execute("SELECT to_regclass('cluster_migrations') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT count(*) FROM cluster_migrations").fetchone()[0]


# --- the statements ----------------------------------------------------------------------------

RENEW = """
    UPDATE cluster_tasks SET lease_until = now() + make_interval(secs => %(lease)s)
    WHERE id = %(id)s AND attempt = %(attempt)s AND state = 'in_progress'"""

# A lease past its end goes back to pending with its attempt counted (the next claim raises it),
# or fails as lost once max_attempts claims were spent, like the file spool's recovery; or as
# expired when its expires_at has passed meanwhile: no attempt may start after that, and the
# origin's timer for it fired while it was leased.
_GONE = "(t.expires_at <= now() OR t.attempt >= t.max_attempts)"
_EXPIRED = "t.expires_at <= now()"
_WHY = ("' (worker ' || coalesce(t.worker_id, '?') || ' on ' || coalesce(t.host, '?') ||"
        " ' died or was cut off)'")
TAKE_BACK = f"""
    WITH expired AS (
        SELECT id FROM cluster_tasks
        WHERE state = 'in_progress' AND lease_until < now()
        FOR UPDATE SKIP LOCKED),
    back AS (
        UPDATE cluster_tasks t SET
            state = CASE WHEN {_GONE} THEN 'failed' ELSE 'pending' END,
            outcome = CASE WHEN {_GONE} THEN {batch.failed_outcome(
                f"CASE WHEN {_EXPIRED} THEN 'expired' ELSE 'lost' END",
                f"CASE WHEN {_EXPIRED} "
                "THEN 'expired while leased: its lease ran out after its expires_at' "
                f"ELSE 'the lease of its last attempt ran out' END || {_WHY}")} END,
            finished_at = CASE WHEN {_GONE} THEN now() END,
            worker_id = NULL, lease_until = NULL
        FROM expired WHERE t.id = expired.id
        RETURNING t.id, t.state, t.craftsman, t.origin)
    SELECT id, state, pg_notify(
        CASE WHEN state = 'pending' THEN 'koubou_tasks' ELSE 'koubou_outcomes' END,
        CASE WHEN state = 'pending' THEN craftsman ELSE origin END) FROM back"""

# The row's spend in the period asked for. A period only moves forward: a host whose clock lags
# (still yesterday at midnight) counts in the row's newer period, never resets it to its own,
# so two hosts either side of midnight cannot take turns starting the day from nothing.
# ISO dates and months sort as text.
_DAY = "(CASE WHEN %(day)s > day THEN 0 ELSE day_usd END + %(amount)s)"
_MONTH = "(CASE WHEN %(month)s > month THEN 0 ELSE month_usd END + %(amount)s)"
RESERVE = f"""
    WITH taken AS (
        UPDATE cluster_budget SET day_usd = {_DAY}, month_usd = {_MONTH},
            day = greatest(day, %(day)s), month = greatest(month, %(month)s)
        WHERE scope = %(scope)s
            AND (%(daily)s::numeric IS NULL OR {_DAY} <= %(daily)s::numeric)
            AND (%(monthly)s::numeric IS NULL OR {_MONTH} <= %(monthly)s::numeric)
        RETURNING day, month)
    INSERT INTO cluster_reservations (task_id, attempt, craftsman, host, day, month, reserved_usd)
    SELECT %(task)s, %(attempt)s, %(craftsman)s, %(host)s, day, month, %(amount)s FROM taken
    RETURNING id"""

SETTLE = """
    WITH r AS (
        UPDATE cluster_reservations SET settled = true, cost_usd = coalesce(%(cost)s, reserved_usd)
        WHERE id = %(id)s AND NOT settled
        RETURNING day, month, coalesce(%(cost)s, reserved_usd) - reserved_usd AS delta)
    UPDATE cluster_budget b SET
        day_usd = greatest(0, b.day_usd + CASE WHEN b.day = r.day THEN r.delta ELSE 0 END),
        month_usd = greatest(0, b.month_usd + CASE WHEN b.month = r.month THEN r.delta ELSE 0 END)
    FROM r WHERE b.scope = %(scope)s"""


SETTLE_LOST = """
    UPDATE cluster_reservations SET settled = true, cost_usd = reserved_usd
    WHERE task_id = %(task)s AND host = %(host)s AND NOT settled"""

# Reserved and spent in this day and month (or nothing yet, when the row is still in older ones).
SPENT = """
    SELECT CASE WHEN %(day)s > day THEN 0 ELSE day_usd END,
           CASE WHEN %(month)s > month THEN 0 ELSE month_usd END
    FROM cluster_budget WHERE scope = %(scope)s"""

# What was really spent in the row's periods: its figures less the reservations still open
# (in flight, few, and indexed), since a settle replaces a reservation by its cost there. Each
# with the period it is of: the asker's, or the row's newer one (the asker's clock lags).
SETTLED = """
    SELECT greatest(%(day)s, b.day), CASE WHEN %(day)s > b.day THEN 0 ELSE b.day_usd - coalesce((
               SELECT sum(reserved_usd) FROM cluster_reservations
               WHERE NOT settled AND day = b.day), 0) END,
           greatest(%(month)s, b.month), CASE WHEN %(month)s > b.month THEN 0 ELSE
               b.month_usd - coalesce((SELECT sum(reserved_usd) FROM cluster_reservations
               WHERE NOT settled AND month = b.month), 0) END
    FROM cluster_budget b WHERE b.scope = %(scope)s"""

RECORD_ALERT = """
    INSERT INTO cluster_alerts (period, percent, host, spent_usd, limit_usd)
    VALUES (%(period)s, %(percent)s, %(host)s, %(spent)s, %(limit)s)
    ON CONFLICT DO NOTHING"""

EXPIRE_RESERVATIONS = """
    UPDATE cluster_reservations SET settled = true, cost_usd = reserved_usd
    WHERE NOT settled AND at < now() - make_interval(secs => %(age)s)"""


_RECENT = "koubou_recent(requests, extract(epoch FROM now())::float8 - 60)"
COUNT_REQUEST = f"""
    UPDATE cluster_windows SET requests = {_RECENT} || jsonb_build_array(jsonb_build_array(
            extract(epoch FROM now())::float8, %(tokens)s::int))
    WHERE craftsman = %(craftsman)s
        AND (%(rpm)s::int IS NULL OR jsonb_array_length({_RECENT}) < %(rpm)s::int)
        AND (%(tpm)s::int IS NULL OR jsonb_array_length({_RECENT}) = 0
             OR koubou_tokens({_RECENT}) + %(tokens)s::int <= %(tpm)s::int)
    RETURNING 1"""


# --- the queue ---------------------------------------------------------------------------------

class Cluster:
    """One host's handle on the cluster database; one connection, opened on first use and
    again after it was lost. Every method raises ClusterUnavailable while it cannot be reached."""

    def __init__(self, dsn: str, *, host: str, lease_s: float = 60.0) -> None:
        self.dsn = dsn
        self.host = host
        self.lease_s = float(lease_s)
        self._conn: psycopg.Connection | None = None

    @classmethod
    def open(cls, dsn: str, *, host: str, lease_s: float = 60.0) -> Cluster:
        """A handle whose database has the schema (created on the first connect)."""
        cluster = cls(dsn, host=host, lease_s=lease_s)
        cluster._run(migrate)
        return cluster

    def close(self) -> None:
        """Close the connection."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def schema_version(self) -> int:
        """How many migrations the database holds (0: none yet)."""
        return self._run(schema_version)

    def ensure_schema(self) -> list[str]:
        """Apply what migrations the database lacks (a reconnect to a new server); their names."""
        return self._run(migrate)

    def _run(self, operation: Any, *args: Any) -> Any:
        """operation(conn, *args) on the open connection; a lost one is dropped (the next call
        connects again) and becomes ClusterUnavailable."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn)
        try:
            return operation(self._conn, *args)
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self.close_quietly()
            raise unavailable(exc) from None

    def close_quietly(self) -> None:
        """Drop a connection that failed, whatever state it is in."""
        conn, self._conn = self._conn, None
        close_quietly(conn)

    def _rows(self, sql: str, params: dict[str, Any]) -> list[tuple]:
        def query(conn: psycopg.Connection) -> list[tuple]:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
        return self._run(query)

    def _fenced(self, ids: Sequence[str], statements: Sequence[str],
                params: dict[str, Any]) -> list[tuple]:
        """The rows of the last of `statements`, run in order in one transaction after the
        fence locks of these ids (batch.LOCK_FENCES)."""
        def query(conn: psycopg.Connection) -> list[tuple]:
            with conn.transaction():
                conn.execute(batch.LOCK_FENCES, {"ids": list(ids)})
                for sql in statements:
                    cursor = conn.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        return self._run(query)

    def _count(self, sql: str, params: dict[str, Any]) -> int:
        return self._run(lambda conn: conn.execute(sql, params).rowcount)

    # --- the task's path ---------------------------------------------------------------------

    def submit(self, submissions: Iterable[Submission]) -> list[tuple[str, str, bool]]:
        """Queue tasks in one transaction; (id, state, new) each. An id already there queues
        nothing and reports its state, so submitting again is safe; only a task this host was
        delivered the outcome of (retried here) waits again, as a new run (batch.SUBMIT): one
        whose file names the run it was delivered (`delivered_run`) counts as delivered, said
        or not (batch.MARK_RETRIED)."""
        given = list(submissions)
        if not given:
            return []
        first: dict[str, Submission] = {}  # one row per id: ON CONFLICT DO UPDATE requires it
        for item in given:
            first.setdefault(item.task.id, item)
        items = list(first.values())
        now = time.time()
        bodies = [task_format.encode({**item.task.raw, "submitted_at": item.task.raw.get(
            "submitted_at") or task_format.iso(now)}) for item in items]
        params = {
            "ids": [item.task.id for item in items], "origins": [self.host] * len(items),
            "craftsmen": [item.craftsman for item in items],
            "priorities": [item.task.priority for item in items],
            "max_attempts": [item.max_attempts for item in items],
            "not_before": [_timestamp(item.task.not_before) for item in items],
            "expires_at": [_timestamp(item.task.expires_at) for item in items],
            "bodies": bodies}
        retried = [(item.task.id, item.delivered_run) for item in items
                   if item.delivered_run is not None]
        statements = [batch.SUBMIT]
        if retried:
            statements.insert(0, batch.MARK_RETRIED)
            params |= {"origin": self.host, "retried": [i for i, _ in retried],
                       "runs": [r for _, r in retried]}
        new = {row[0] for row in self._fenced(params["ids"], statements, params)}
        states = self.states([i for i in params["ids"] if i not in new])
        results = []
        for task_id in (item.task.id for item in given):  # an id twice: new the first time
            results.append((task_id, states.get(task_id, "pending"), task_id in new))
            new.discard(task_id)
        return results

    def claim(self, worker_id: str, craftsmen: Sequence[str]) -> ClusterClaim | None:
        """Lease the best pending task of these craftsmen; None when there is none."""
        claims = self.claim_many(worker_id, craftsmen, 1)
        return claims[0] if claims else None

    def claim_many(self, worker_id: str, craftsmen: Sequence[str], limit: int, *,
                   others_only: bool = False) -> list[ClusterClaim]:
        """Lease up to `limit` pending tasks of these craftsmen in one statement, best first
        (priority, then submit order). Locked rows are skipped: claimers never wait on each
        other. `others_only`: none this host submitted (a bridge's take-in)."""
        rows = self._rows(batch.CLAIM, {"worker": worker_id, "host": self.host,
                                        "lease": self.lease_s, "craftsmen": list(craftsmen),
                                        "limit": limit, "others": others_only})
        rows.sort(key=lambda row: (-row[6], row[7]))  # RETURNING keeps no order
        return [ClusterClaim(task_id, attempt, worker_id, craftsman, origin, bytes(body),
                             max_attempts, run, adopted)
                for task_id, attempt, craftsman, origin, body, max_attempts, _, _, run, adopted
                in rows]

    def next_due_s(self, craftsmen: Sequence[str]) -> float | None:
        """Seconds until the first pending task of these craftsmen held back by its not_before
        may be claimed (its NOTIFY went out when it was submitted); None when none waits."""
        found = self._rows(batch.NEXT_DUE, {"craftsmen": list(craftsmen)})
        return None if not found or found[0][0] is None else max(0.0, float(found[0][0]))

    def renew(self, claim: ClusterClaim) -> bool:
        """Extend one lease by lease_s from now; False when it was revoked: stop working on it."""
        return self._count(RENEW, {"id": claim.task_id, "attempt": claim.attempt,
                                   "lease": self.lease_s}) == 1

    def heartbeat(self, worker_id: str, claims: Iterable[ClusterClaim]) -> list[ClusterClaim]:
        """Renew these leases of a worker and its registration in one statement; the claims of
        `claims` that were revoked meanwhile. Only these: a row of the worker's it does not
        track (a claim whose reply was lost, a give-back that failed) runs out its lease and
        is taken back, rather than held for as long as the worker lives."""
        given = list(claims)
        held = {(task_id, attempt) for task_id, attempt in self._rows(batch.RENEW, {
            "worker": worker_id, "lease": self.lease_s,
            "ids": [c.task_id for c in given], "attempts": [c.attempt for c in given]})}
        return [c for c in given if (c.task_id, c.attempt) not in held]

    def take_back_expired(self) -> list[tuple[str, str]]:
        """Take back every lease past its end: (id, 'pending' or 'failed') each; waiters are
        woken. Any process may run it; concurrent runs split the rows between them."""
        rows = self._rows(TAKE_BACK, {"at": task_format.iso(time.time())})
        return [(task_id, state) for task_id, state, _ in rows]

    def publish(self, claim: ClusterClaim, record: dict[str, Any]) -> bool:
        """Publish a claim's outcome record (completed or failed); False, and nothing changed,
        when its lease was revoked (the fence). Safe to call again after ClusterUnavailable."""
        return bool(self.publish_many([(claim, record)]))

    def publish_many(self, outcomes: Sequence[tuple[ClusterClaim, dict[str, Any]]]) -> set[str]:
        """Publish the outcome records of these claims in one statement; the ids published.
        A revoked claim's changes nothing (the fence). Safe to call again after
        ClusterUnavailable: an outcome already published under its claim counts as published."""
        if not outcomes:
            return set()
        params = {"ids": [claim.task_id for claim, _ in outcomes],
                  "attempts": [claim.attempt for claim, _ in outcomes],
                  "workers": [claim.worker_id for claim, _ in outcomes],
                  "states": [record["status"] for _, record in outcomes],
                  "outcomes": [outcome_json(record) for _, record in outcomes]}
        published = {row[0] for row in self._rows(batch.PUBLISH, params)}
        if len(published) < len(outcomes):
            published |= {row[0] for row in self._rows(batch.PUBLISHED_BY, params)}
        return published

    def adopt(self, adoptions: Sequence[tuple[ClusterClaim, int]]) -> set[str]:
        """Record that this host took these leased tasks in by adopting an older run of each
        it still had pending or running (claim, that run); the ids recorded, only while their
        claims hold them (the fence). A later lease of the same run here reads it back."""
        if not adoptions:
            return set()
        return {row[0] for row in self._rows(batch.ADOPT, {
            "host": self.host, "ids": [claim.task_id for claim, _ in adoptions],
            "attempts": [claim.attempt for claim, _ in adoptions],
            "runs": [run for _, run in adoptions]})}

    def requeue(self, claim: ClusterClaim) -> bool:
        """Give a leased task back to pending (its attempt stays counted); False if revoked."""
        return bool(self.requeue_many([claim]))

    def requeue_many(self, claims: Sequence[ClusterClaim], *,
                     counted: bool = True) -> set[str]:
        """Give leased tasks back to pending in one statement; the ids given back (a revoked
        claim gives nothing back). One given back counted on its last attempt fails as lost.
        `counted=False` for leases whose task never started (a take-in the disk refused):
        they spend none of its max_attempts."""
        if not claims:
            return set()
        return {row[0] for row in self._rows(batch.REQUEUE, {
            "ids": [c.task_id for c in claims], "attempts": [c.attempt for c in claims],
            "counted": counted, "at": task_format.iso(time.time()), "host": self.host})}

    def cancel(self, task_id: str, outcome: dict[str, Any]) -> bool:
        """End a task this host submitted with its cancelled outcome, if the cluster has it
        and it has not finished; whether it did (a task that never left matches nothing)."""
        return self._count(CANCEL, {"origin": self.host, "id": task_id,
                                    "outcome": outcome_json(outcome),
                                    "channel": CANCEL_CHANNEL}) == 1

    def withdraw(self, craftsmen: Sequence[str], granted: int,
                 ids: Sequence[str]) -> dict[str, int]:
        """Take this host's pending tasks of these craftsmen, among these ids, out of the
        cluster; the attempts each spent there, by id (`granted`: the max_attempts they were
        forwarded with)."""
        if not craftsmen or not ids:
            return {}
        return dict(self._fenced(ids, [batch.WITHDRAW], {
            "origin": self.host, "craftsmen": list(craftsmen), "granted": granted,
            "ids": list(ids)}))

    def purge(self, age_s: float) -> int:
        """Delete this host's tasks delivered more than `age_s` ago; how many."""
        params = {"origin": self.host, "age_s": age_s}

        def query(conn: psycopg.Connection) -> int:
            with conn.transaction():
                ids = [row[0] for row in conn.execute(batch.PURGEABLE, params)]
                if not ids:
                    return 0
                conn.execute(batch.LOCK_FENCES, {"ids": ids})
                return conn.execute(batch.PURGE, params | {"ids": ids}).rowcount
        return self._run(query)

    def open_forwarded(self) -> list[str]:
        """The ids of the tasks this host submitted that the cluster has not finished."""
        return [row[0] for row in self._rows(batch.OPEN_FORWARDED, {"origin": self.host})]

    def expire(self, task_id: str, outcome: dict[str, Any]) -> bool:
        """Fail a task this host submitted with its expired outcome, if no host has it now
        (one that started it decides for itself); whether it did."""
        return self._count(EXPIRE, {"origin": self.host, "id": task_id,
                                    "outcome": outcome_json(outcome)}) == 1

    # --- outcomes back to their origin --------------------------------------------------------

    def undelivered(self, limit: int = 500, skip: int = 0) -> list[Delivery]:
        """This host's finished tasks not yet written into its spool, oldest first, from the
        `skip`th."""
        rows = self._rows(batch.UNDELIVERED, {"origin": self.host, "limit": limit,
                                              "skip": skip})
        return [Delivery(*row) for row in rows]

    def mark_delivered(self, task_ids: Iterable[str]) -> int:
        """Note outcomes as written durably into this host's spool: only after they are."""
        return self._count(batch.MARK_DELIVERED, {"origin": self.host, "ids": list(task_ids)})

    # --- lookups and workers -------------------------------------------------------------------

    def states(self, task_ids: Iterable[str]) -> dict[str, str]:
        """The state of each of these ids that is in the cluster."""
        return self._by_id("state", task_ids)

    def ends_of(self, task_ids: Iterable[str]) -> dict[str, str | None]:
        """The state of each of these ids in the cluster, `cancelled` for one its origin
        cancelled (its outcome's error kind)."""
        return self._by_id("CASE WHEN outcome->'error'->>'kind' = 'cancelled' THEN 'cancelled' "
                           "ELSE state END", task_ids)

    def origins_of(self, task_ids: Iterable[str]) -> dict[str, str]:
        """The origin host of each of these ids that is in the cluster."""
        return self._by_id("origin", task_ids)

    def _by_id(self, column: str, task_ids: Iterable[str]) -> dict[str, str]:
        ids = list(task_ids)
        if not ids:
            return {}
        return dict(self._rows(f"SELECT id, {column} FROM cluster_tasks WHERE id = ANY(%(ids)s)",
                               {"ids": ids}))

    def counts(self) -> dict[str, int]:
        """Tasks in each state, across the cluster."""
        counts = dict.fromkeys(("pending", "in_progress", "completed", "failed"), 0)
        counts.update(self._rows("SELECT state, count(*) FROM cluster_tasks GROUP BY state", {}))
        return counts

    def register_worker(self, worker_id: str, pid: int, craftsmen: Sequence[str]) -> None:
        """Register (or re-register) a worker of this host."""
        self._count("""
            INSERT INTO cluster_workers (id, host, pid, craftsmen) VALUES (%(id)s, %(host)s,
                %(pid)s, %(craftsmen)s)
            ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid,
                craftsmen = excluded.craftsmen, heartbeat_at = now()""",
            {"id": worker_id, "host": self.host, "pid": pid, "craftsmen": list(craftsmen)})

    def clock_skew(self) -> float:
        """This host's clock minus the database's, in seconds (half a round trip of error)."""
        before = time.time()
        server = self._rows("SELECT extract(epoch FROM clock_timestamp())::float8", {})[0][0]
        after = time.time()
        return (before + after) / 2 - server

    # --- the budget ------------------------------------------------------------------------------

    def reserve(self, *, task_id: str, attempt: int, craftsman: str, amount: float, day: str,
                month: str, daily_limit: float | None,
                monthly_limit: float | None) -> tuple[str, float]:
        """Reserve a call's worst-case cost against the cluster's budget in one conditional
        UPDATE: ("ok", reservation id), or ("budget", 0) when it does not fit what is left."""
        rows = self._rows(RESERVE, {
            "scope": BUDGET_ROW, "task": task_id, "attempt": attempt, "craftsman": craftsman,
            "host": self.host, "amount": amount, "day": day, "month": month,
            "daily": daily_limit, "monthly": monthly_limit})
        return ("ok", float(rows[0][0])) if rows else ("budget", 0.0)

    def settle(self, reservation_id: float, cost: float | None) -> None:
        """Replace a reservation by the real cost (unknown cost: the reservation stands), in
        the period it was reserved in."""
        self._count(SETTLE, {"scope": BUDGET_ROW, "id": int(reservation_id), "cost": cost})

    def spent(self, day: str, month: str) -> tuple[float, float]:
        """Reserved and spent so far in this day and month (or the newer ones the cluster is in
        already), across the cluster."""
        day_usd, month_usd = self._rows(SPENT, {"day": day, "month": month,
                                                "scope": BUDGET_ROW})[0]
        return float(day_usd), float(month_usd)

    def settled(self, day: str, month: str) -> tuple[tuple[str, float], tuple[str, float]]:
        """What was really spent in this day and month across the cluster (reservations of
        calls in flight left out), what budget alerts are about: (day, spent), (month, spent),
        each period this host's or the newer one the cluster is in already."""
        day, day_usd, month, month_usd = self._rows(SETTLED, {"day": day, "month": month,
                                                              "scope": BUDGET_ROW})[0]
        return (day, max(0.0, float(day_usd))), (month, max(0.0, float(month_usd)))

    def record_alert(self, period: str, percent: int, spent: float, limit: float) -> bool:
        """Note that a threshold alerted in a period, for the whole cluster; False when some
        host's alert of it is there already."""
        return self._count(RECORD_ALERT, {"period": period, "percent": percent,
                                          "host": self.host, "spent": spent,
                                          "limit": limit}) == 1

    def settle_lost(self, task_id: str) -> int:
        """A dead worker's reservations for a task on this host count in full (the call may
        have run): they stay in the period's figures as they are, and are no longer open."""
        return self._count(SETTLE_LOST, {"task": task_id, "host": self.host})

    def expire_reservations(self, older_than_s: float) -> int:
        """Reservations left open longer than any attempt lasts (their host never came back)
        count in full, as a lost attempt's do: the period's figures keep them either way."""
        return self._count(EXPIRE_RESERVATIONS, {"age": float(older_than_s)})


    def count_request(self, craftsman: str, max_rpm: int | None, max_tpm: int | None,
                      tokens: int) -> float:
        """Count a request in the craftsman's cluster-wide minute window if it has room, in
        one conditional UPDATE: 0.0 when counted, else the seconds until it may have room (on
        the database's clock; a hint for the caller's timer, the next try decides)."""
        params = {"craftsman": craftsman, "rpm": max_rpm, "tpm": max_tpm, "tokens": tokens}
        for _ in range(3):  # a row made meanwhile, or a window emptied meanwhile: try again
            if self._rows(COUNT_REQUEST, params):
                return 0.0
            found = self._rows("SELECT requests, extract(epoch FROM now())::float8 FROM "
                               "cluster_windows WHERE craftsman = %(craftsman)s", params)
            if not found:  # the craftsman's first request in the cluster: make its row
                self._count("INSERT INTO cluster_windows (craftsman) VALUES (%(craftsman)s) "
                            "ON CONFLICT DO NOTHING", params)
                continue
            requests, now = found[0]
            recent = sorted(at for at, _ in requests if at > now - 60)
            if recent:
                oldest = (recent[len(recent) - max_rpm]
                          if max_rpm is not None and len(recent) >= max_rpm else recent[0])
                # At most the window: a request another connection counted after this
                # statement's now() (it began first, the other committed first) is not later.
                return min(max(oldest + 60 - now, RATE_RETRY_S), 60.0)
        return RATE_RETRY_S

def _timestamp(ts: float | None) -> datetime | None:
    """A task's time for a timestamptz column; one past what Python can hold (a valid ISO time
    in year 9999 west of UTC) is as good as never."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC)
    except (OverflowError, ValueError, OSError):
        return datetime.max.replace(tzinfo=UTC)


# --- wake-ups ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Wake:
    """What a wait brought: notifications (channel, payload), or `recheck` after a (re)connect,
    when notifications sent meanwhile may have been missed: look once, then wait again."""

    notices: tuple[tuple[str, str], ...] = ()
    recheck: bool = False


class Wakeups:
    """One LISTEN connection on the cluster's channels. No polling: `wait` blocks on the socket
    until a notification or its timeout (the caller's heartbeat)."""

    def __init__(self, dsn: str, channels: Sequence[str] = CHANNELS) -> None:
        unknown = set(channels) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channels {sorted(unknown)}")
        self.dsn = dsn
        self.channels = tuple(channels)
        self._conn: psycopg.Connection | None = None
        self._backoff = BACKOFF_S[0]
        self._listened = False
        self.reconnects = 0  # connections made after the first: for tests and metrics

    def wait(self, timeout: float | None) -> Wake:
        """Block until notifications come, or timeout. While the server cannot be reached this
        retries with a growing pause; the first wait after a connection is made returns
        `recheck` at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._conn is None:
            if self._listen():
                return Wake(recheck=True)
            pause = self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_S[1])
            if deadline is not None:
                pause = min(pause, deadline - time.monotonic())
                if pause <= 0:
                    return Wake()
            time.sleep(pause)
        return self._receive(deadline)

    def _listen(self) -> bool:
        try:
            conn = connect(self.dsn)
        except ClusterUnavailable as exc:
            log.debug("%s", exc)
            return False
        try:
            for channel in self.channels:
                conn.execute(f"LISTEN {channel}")  # names from CHANNELS only, checked above
        except psycopg.Error:
            conn.close()
            return False
        if self._listened:
            self.reconnects += 1
        self._conn, self._backoff, self._listened = conn, BACKOFF_S[0], True
        return True

    def _receive(self, deadline: float | None) -> Wake:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        notices = []
        conn = self._conn  # close() from another thread may clear it: it then closes this one
        if conn is None:
            return Wake()
        try:
            for notify in conn.notifies(timeout=remaining, stop_after=1):
                notices.append((notify.channel, notify.payload))
            if notices:  # take what else has arrived, without waiting
                notices.extend((n.channel, n.payload) for n in conn.notifies(timeout=0))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            log.info("cluster wake-ups lost their connection (%s); reconnecting", exc)
            self.close()
            return Wake(tuple(notices))
        return Wake(tuple(notices))

    def close(self) -> None:
        """Stop listening."""
        conn, self._conn = self._conn, None
        close_quietly(conn)
