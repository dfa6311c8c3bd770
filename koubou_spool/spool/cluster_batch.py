"""The statements of a task's path across hosts, each for many tasks at once (spool/cluster.py
runs them; docs/CLUSTER.md, "A task's path across hosts").

A bridge's round crosses many tasks together, so each step is one statement, hence one
transaction, whatever the number of tasks: submit, claim, publish, requeue, delivery. Every
guarantee of the one-task statements holds row by row: submit is idempotent on the id, claims
skip locked rows, publish and requeue are fenced by (id, attempt) while in progress. The
wake-ups are one pg_notify per craftsman (tasks) or per origin (outcomes) of what committed,
not one per task: a listener needs to know what to look at, not how much. (PostgreSQL folds
identical notifications of one transaction anyway, but only after each call has been made.)

A CTE that only calls pg_notify is run only as far as the outer query reads it, so
`_notifying` joins it into the result: the notifications go out exactly for the rows changed.
"""

from __future__ import annotations


def _notifying(change: str, channel: str, key: str) -> str:
    """A statement that makes `change` (a data-modifying query returning id and `key`) and
    sends one pg_notify on `channel` per distinct `key` of the rows it changed; their ids."""
    return f"""
    WITH done AS ({change}),
    woken AS (SELECT {key}, pg_notify('{channel}', {key}) FROM done GROUP BY {key})
    SELECT done.id FROM done JOIN woken USING ({key})"""


# The ids that were new come back; an id already there inserts nothing, but for one case: its
# origin sends again a task whose outcome it was delivered, which only `koubou retry` there does
# (an id with an outcome in its home is never queued again otherwise). The row then waits again
# as a new run: its attempt number keeps counting, so a lease of the old run stays fenced out,
# and it is given max_attempts more. An id whose row was taken out (purged, or brought home)
# starts from the attempt and the next run its fence kept, for the same reason. The rows go in
# in the order given (the join may reorder them): their seq is the claims' order.
SUBMIT = _notifying("""
    INSERT INTO cluster_tasks (id, origin, craftsman, priority, max_attempts, granted,
                               not_before, expires_at, body, attempt, run)
    SELECT s.id, s.origin, s.craftsman, s.priority, s.granted + coalesce(f.attempt, 0),
        s.granted, s.not_before, s.expires_at, s.body, coalesce(f.attempt, 0),
        coalesce(f.run + 1, 0)
    FROM unnest(%(ids)s::text[], %(origins)s::text[], %(craftsmen)s::text[],
                %(priorities)s::int[], %(max_attempts)s::int[],
                %(not_before)s::timestamptz[], %(expires_at)s::timestamptz[],
                %(bodies)s::bytea[]) WITH ORDINALITY
        AS s(id, origin, craftsman, priority, granted, not_before, expires_at, body, n)
    LEFT JOIN cluster_fences f USING (id)
    ORDER BY s.n
    ON CONFLICT (id) DO UPDATE SET state = 'pending', craftsman = excluded.craftsman,
        priority = excluded.priority, not_before = excluded.not_before,
        expires_at = excluded.expires_at, body = excluded.body,
        max_attempts = cluster_tasks.attempt + excluded.granted, granted = excluded.granted,
        outcome = NULL, run = cluster_tasks.run + 1, adopted_run = NULL, adopted_host = NULL,
        worker_id = NULL, host = NULL, lease_until = NULL, finished_at = NULL,
        delivered_at = NULL
    WHERE cluster_tasks.origin = excluded.origin AND cluster_tasks.delivered_at IS NOT NULL
        AND cluster_tasks.state IN ('completed', 'failed')
    RETURNING id, craftsman""", "koubou_tasks", "craftsman")

# The fence locks of these ids, held to the end of the transaction, taken in one order (no two
# takers wait for each other). SUBMIT, PURGE and WITHDRAW each run after them, in the same
# transaction: a submit that raced the delete of its id's row would read the fences from a
# snapshot taken before that delete committed, and start the id afresh at attempt 0.
FENCE_SPACE = 0x6B6F7566  # "kouf": the first key of the locks; the second, the id's hash
LOCK_FENCES = f"""
    SELECT count(pg_advisory_xact_lock({FENCE_SPACE}, h))
    FROM (SELECT DISTINCT hashtext(id) AS h FROM unnest(%(ids)s::text[]) AS id ORDER BY h) AS s"""

# Rows taken out of the cluster leave their fence: the attempt and run they had reached.
_FENCE = """
    INSERT INTO cluster_fences (id, attempt, run) SELECT id, attempt, run FROM gone
    ON CONFLICT (id) DO UPDATE SET attempt = excluded.attempt, run = excluded.run,
        at = now()"""

# Seconds (on the database's clock) until the first pending row of these craftsmen that waits
# for its not_before may be claimed; NULL when none waits.
NEXT_DUE = """
    SELECT EXTRACT(EPOCH FROM min(not_before) - now())::float8 FROM cluster_tasks
    WHERE state = 'pending' AND craftsman = ANY(%(craftsmen)s::text[]) AND not_before > now()"""

# Up to `limit` of the best pending rows of these craftsmen, locked as they are picked; rows
# another claimer holds are skipped, so claimers never wait on each other. With `others`, no row
# of the claimer's own host: a bridge's own task is still there, held as the task's face, and
# taking it in would queue nothing and hold the lease for ever.
CLAIM = """
    WITH picked AS (
        SELECT id FROM cluster_tasks
        WHERE state = 'pending' AND craftsman = ANY(%(craftsmen)s::text[])
            AND (not_before IS NULL OR not_before <= now())
            AND NOT (%(others)s AND origin = %(host)s)
        ORDER BY priority DESC, seq LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    UPDATE cluster_tasks t SET state = 'in_progress', attempt = attempt + 1,
        worker_id = %(worker)s, host = %(host)s, claimed_at = now(),
        lease_until = now() + make_interval(secs => %(lease)s)
    FROM picked WHERE t.id = picked.id
    RETURNING t.id, t.attempt, t.craftsman, t.origin, t.body, t.max_attempts, t.priority, t.seq,
        t.run, CASE WHEN t.adopted_host = %(host)s THEN t.adopted_run END"""

# The older run each of these leased tasks has still pending or running on the claimer's host,
# taken in under the lease's run: fenced as publish is (spool/bridge.py, take_in).
ADOPT = """
    UPDATE cluster_tasks t SET adopted_run = a.run, adopted_host = %(host)s
    FROM unnest(%(ids)s::text[], %(attempts)s::int[], %(runs)s::int[]) AS a(id, attempt, run)
    WHERE t.id = a.id AND t.attempt = a.attempt AND t.state = 'in_progress'
    RETURNING t.id"""

# Each outcome under its claim's (id, attempt), only while that claim holds the task.
PUBLISH = _notifying("""
    UPDATE cluster_tasks t SET state = s.state, outcome = s.outcome, finished_at = now(),
        lease_until = NULL
    FROM unnest(%(ids)s::text[], %(attempts)s::int[], %(states)s::text[],
                %(outcomes)s::jsonb[]) AS s(id, attempt, state, outcome)
    WHERE t.id = s.id AND t.attempt = s.attempt AND t.state = 'in_progress'
    RETURNING t.id, t.origin""", "koubou_outcomes", "origin")

# Which of these claims' outcomes stand under their own attempt: a publish that got no answer
# (the reply lost in a restart) had committed. Only the holder of an attempt can have finished
# the task under it.
PUBLISHED_BY = """
    SELECT t.id FROM cluster_tasks t
    JOIN unnest(%(ids)s::text[], %(attempts)s::int[], %(workers)s::text[])
        AS c(id, attempt, worker_id) USING (id, attempt, worker_id)
    WHERE t.state IN ('completed', 'failed')"""

# The holder's heartbeat: each of these leases (its worker's, while in progress) for lease_s
# more, and the worker's registration; the leases renewed. Fenced as publish is: a lease the
# holder does not name is not renewed, even under its worker's id.
RENEW = """
    WITH renewed AS (
        UPDATE cluster_tasks t SET lease_until = now() + make_interval(secs => %(lease)s)
        FROM unnest(%(ids)s::text[], %(attempts)s::int[]) AS c(id, attempt)
        WHERE t.id = c.id AND t.attempt = c.attempt AND t.worker_id = %(worker)s
            AND t.state = 'in_progress'
        RETURNING t.id, t.attempt),
    beat AS (
        UPDATE cluster_workers SET heartbeat_at = now() WHERE id = %(worker)s)
    SELECT id, attempt FROM renewed"""

def failed_outcome(kind: str, message: str) -> str:
    """SQL for the failed outcome of row `t`, as an outcome file has it: its task's fields and
    an error of this kind and message (SQL expressions), at %(at)s, its attempts counted."""
    return f"""convert_from(t.body, 'UTF8')::jsonb || jsonb_build_object(
        'status', 'failed', 'error', jsonb_build_object(
            'kind', {kind}, 'attempts', t.attempt, 'at', %(at)s::text, 'message', {message}))"""


# Back to pending, fenced as publish is, their attempts counted; or not counted (the task never
# started): then the allowance rises by one, since the attempt number, the fence, never goes
# down. Counted on its last attempt, a task fails as lost instead, as a lease that ran out on
# it does (cluster.TAKE_BACK), its outcome for its origin.
_SPENT = "(%(counted)s AND t.attempt >= t.max_attempts)"
REQUEUE = f"""
    WITH back AS (
        UPDATE cluster_tasks t SET
            state = CASE WHEN {_SPENT} THEN 'failed' ELSE 'pending' END,
            outcome = CASE WHEN {_SPENT} THEN {failed_outcome(
                "'lost'", "'its last attempt was given back by host ' || %(host)s || "
                "': no live worker there serves craftsman ' || t.craftsman")} END,
            finished_at = CASE WHEN {_SPENT} THEN now() END,
            worker_id = NULL, lease_until = NULL,
            max_attempts = t.max_attempts + CASE WHEN %(counted)s THEN 0 ELSE 1 END
        FROM unnest(%(ids)s::text[], %(attempts)s::int[]) AS c(id, attempt)
        WHERE t.id = c.id AND t.attempt = c.attempt AND t.state = 'in_progress'
        RETURNING t.id, t.state, t.craftsman, t.origin),
    woken AS (  -- one wake-up per channel and payload
        SELECT pg_notify(channel, payload) FROM (
            SELECT DISTINCT
                CASE WHEN state = 'pending' THEN 'koubou_tasks' ELSE 'koubou_outcomes' END,
                CASE WHEN state = 'pending' THEN craftsman ELSE origin END
            FROM back) AS wake(channel, payload))
    SELECT id FROM back, (SELECT count(*) FROM woken) AS sent"""

# This origin's tasks of these craftsmen that no host holds a lease of, taken out of the
# cluster: a worker of their craftsman is back on their home, which runs them itself
# (spool/bridge.py, bring_home). A row another host is claiming makes the DELETE wait for that
# claim's commit and look again: a row leased meanwhile stays. With each id, the attempts its
# run spent in the cluster (leases that were lost), for the home to go on counting from; rows
# older than migration 0008 do not know what their run was granted, `granted` stands for it.
WITHDRAW = f"""
    WITH gone AS (
        DELETE FROM cluster_tasks
        WHERE origin = %(origin)s AND craftsman = ANY(%(craftsmen)s::text[])
            AND state = 'pending' AND id = ANY(%(ids)s::text[])
        RETURNING id, attempt, run, max_attempts, granted),
    fenced AS ({_FENCE})
    SELECT id, greatest(0, attempt - (max_attempts - coalesce(granted, %(granted)s)))
    FROM gone"""

# This origin's rows whose outcome it was delivered before the retention's age, on the
# database's clock (`koubou maintain --purge-after`): the outcome lives on in the origin's
# spool for as long as its own retention keeps it. Each leaves its fence (a few bytes): the id
# retried there later goes on from its attempt and run.
PURGEABLE = """
    SELECT id FROM cluster_tasks
    WHERE origin = %(origin)s AND delivered_at < now() - make_interval(secs => %(age_s)s)"""
PURGE = f"""
    WITH gone AS (
        DELETE FROM cluster_tasks
        WHERE origin = %(origin)s AND delivered_at < now() - make_interval(secs => %(age_s)s)
            AND id = ANY(%(ids)s::text[])
        RETURNING id, attempt, run)
    {_FENCE}"""

# The tasks this origin forwarded that the cluster has not finished.
OPEN_FORWARDED = """
    SELECT id FROM cluster_tasks
    WHERE origin = %(origin)s AND state IN ('pending', 'in_progress')"""

UNDELIVERED = """
    SELECT id, state, outcome, attempt, run, host FROM cluster_tasks
    WHERE origin = %(origin)s AND state IN ('completed', 'failed') AND delivered_at IS NULL
    ORDER BY finished_at, id OFFSET %(skip)s LIMIT %(limit)s"""

# A retried task's file names the run whose outcome its origin was given (the `cluster` field
# the delivery wrote into that outcome): that run was delivered, even when the bridge that wrote
# it died before saying so. Run before SUBMIT, in its transaction, so that the retry is a new run
# rather than an id already there, whose old outcome would answer it.
MARK_RETRIED = """
    UPDATE cluster_tasks t SET delivered_at = now()
    FROM unnest(%(retried)s::text[], %(runs)s::int[]) AS r(id, run)
    WHERE t.id = r.id AND t.origin = %(origin)s AND t.run <= r.run AND t.delivered_at IS NULL
        AND t.state IN ('completed', 'failed')"""

MARK_DELIVERED = """
    UPDATE cluster_tasks SET delivered_at = now()
    WHERE origin = %(origin)s AND id = ANY(%(ids)s::text[]) AND delivered_at IS NULL
        AND state IN ('completed', 'failed')"""
