"""The origin's half of the bridge between a home's file spool and the cluster (docs/CLUSTER.md,
"A task's path across hosts", steps 1 and 5).

`forward` takes pending tasks out to the cluster: a local claim of each by the bridge (the
file spool's rename, so one owner), then one idempotent insert of them all. A claim stays in
in_progress/ as the task's face on its host until `deliver` publishes the outcome into it:
completed/ or failed/, fsynced, and only then marked delivered in the database. Both are safe
to run again after a crash at any point: an insert of an id already there inserts nothing, and
an outcome already in the spool is only marked.

The serving host's half: `take_in` leases cluster tasks of a craftsman this host serves and
queues them in its own pending/, pinned to that craftsman, where its workers run them as any
task; `send_back` publishes the local outcomes of the leases held, fenced by (id, attempt);
`renew` keeps the leases alive meanwhile and drops the revoked ones. A task whose lease was
lost and that comes back to this host finds its local outcome and is sent back without a
second run; one retried on its origin since (a new run of its row) runs again.

Each step is one statement for all the tasks a bridge's round has (spool/cluster_batch.py),
and the spool's side of a step one fsync per directory, however many tasks cross.

The process that runs all this on inotify, NOTIFY and a heartbeat, and chooses which tasks
leave, is service/bridging.py (`koubou cluster`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..errors import ClusterUnavailable, InvalidTask, TaskNotFound
from . import task as task_format
from .cluster import Cluster, ClusterClaim, Delivery, Submission, holds_nul
from .entries import BRIDGE_PREFIX, Claim, Outcome, Refused, Unavailable
from .files import CLAIM_RE, Spool
from .recovery import delivered_face, give_back
from .task import Task

log = logging.getLogger(__name__)

FROM_KEY = "koubou_cluster_from"  # in a taken-in task's metadata: the host it came from
RUN_KEY = "koubou_cluster_run"  # and the run of its cluster row it was leased in
# In an outcome delivered to its origin: {"host": the host that ran it, "run": its row's run}.
# `koubou retry` keeps it in the task it queues again, which so names the run it was given.
CLUSTER_FIELD = "cluster"


def taken_in(task: task_format.Task) -> bool:
    """Whether a task was queued here by take_in: it runs here, it never leaves again."""
    return isinstance(task.raw.get("metadata"), dict) and FROM_KEY in task.raw["metadata"]


def forward(spool: Spool, cluster: Cluster, leaving: list[tuple[str, str]], bridge_id: str,
            max_attempts: int = 3) -> list[Task]:
    """Send the pending tasks of `leaving` (file name, craftsman) to the cluster in one
    transaction; the tasks sent. A file a worker of this home took first is left to it; one that
    is no task goes back to pending/, to be rejected there. ClusterUnavailable (and every file
    back in pending/) when the database cannot be reached: they wait there, as any task does."""
    claims, submissions = [], []
    for name, craftsman in leaving:
        claimed = _claim_task(spool, name, bridge_id)
        if claimed is not None and holds_nul(claimed[1].raw):
            _refuse(spool, *claimed, "it holds the character U+0000, which the cluster's "
                    "database cannot store, so it cannot cross hosts: remove it, or serve "
                    f"craftsman {craftsman} on this host")
        elif claimed is not None:
            claims.append(claimed[0])
            submissions.append(Submission(claimed[1], craftsman, max_attempts,
                                          delivered_run(claimed[1].raw)))
    try:
        results = cluster.submit(submissions)
        there = {task_id for task_id, _, new in results if not new}
        elsewhere = cluster.origins_of(there)
    except BaseException:
        # Back uncounted: the bridge's claims are no attempts. A commit whose reply was lost
        # is harmless: the next forward of the same ids inserts nothing.
        for claim in claims:
            spool.requeue(claim.file_name, None)
        raise
    sent = []
    for claim, submission in zip(claims, submissions, strict=True):
        task_id = submission.task.id
        origin = elsewhere.get(task_id, cluster.host)
        if task_id in there and task_id not in elsewhere:
            spool.requeue(claim.file_name, None)  # gone between the two: the next round sends it
        elif origin == cluster.host:
            sent.append(submission.task)
        else:
            _refuse_taken_id(spool, claim, submission.task, origin)
    return sent


def delivered_run(raw: dict) -> int | None:
    """The cluster run whose outcome this task was given on its origin (a retried task keeps
    its outcome's CLUSTER_FIELD); None for a task never delivered from the cluster."""
    mark = raw.get(CLUSTER_FIELD)
    run = mark.get("run") if isinstance(mark, dict) else None
    return run if isinstance(run, int) and not isinstance(run, bool) and run >= 0 else None


def _refuse_taken_id(spool: Spool, claim: Claim, task: Task, origin: str) -> None:
    """A task whose id another host's task has in the cluster: one id is one task there (the
    idempotence of §3), whose outcome goes to its own origin only, so this one would wait for
    ever. It fails here as invalid, saying whose the id is."""
    _refuse(spool, claim, task, f"task id {task.id} is taken in the cluster by a task submitted "
            f"on host {origin} (`koubou status {task.id}` shows it); ids are unique across "
            "the cluster's hosts: submit this one under another id")


def _refuse(spool: Spool, claim: Claim, task: Task, why: str) -> None:
    """Fail a task the bridge claimed to forward here, as invalid: `why` it cannot cross."""
    log.warning("%s not forwarded: %s", task.id, why)
    record = task_format.failed_record(task.raw, "invalid", why, task.attempts, time.time())
    try:
        spool.publish(claim, task.id, record)
    except OSError as exc:  # back to pending/: the next round refuses it again
        log.warning("%s could not be failed here: %s", task.id, exc)
        try:
            spool.requeue(claim.file_name, None)
        except OSError:
            pass  # claimed still, by this bridge: its successor adopts it and looks again


def _claim_task(spool: Spool, name: str, bridge_id: str) -> tuple[Claim, Task] | None:
    """The bridge's claim on pending/<name> and the task it holds; None when a worker took it
    first, or when it is no task (back in pending/, uncounted, for a worker to reject)."""
    try:
        claim = spool.claim(name, bridge_id)
    except OSError as exc:  # a name too long for the claim's suffix
        log.warning("could not forward %s: %s", name, exc)
        return None
    if claim is None:
        return None
    try:
        data, _ = spool.read_claim(claim)
        return claim, task_format.parse(data, default_id=task_format.id_from_name(name))
    except (InvalidTask, OSError, Refused, Unavailable) as exc:
        log.warning("could not forward %s: %s", name, exc)
        spool.requeue(claim.file_name, None)
        return None


def deliver(spool: Spool, cluster: Cluster, bridge_id: str, limit: int = 500) -> list[str]:
    """Write this host's finished cluster tasks into its spool, `limit` at a time, then mark
    them delivered; the ids delivered. A host that was down gets everything undelivered when it
    comes back. One that cannot be placed now (its face moved, or gone) stays undelivered, for
    a later round, and is looked past: oldest first, it would hold back every newer outcome."""
    delivered: list[str] = []
    left = 0  # the oldest rows still undelivered after this round's pages
    while True:
        page = cluster.undelivered(limit, skip=left)
        placed = place(spool, page, bridge_id)
        if placed:
            cluster.mark_delivered(placed)
        delivered += placed
        left += len(page) - len(placed)
        if len(page) < limit:
            return delivered


def place(spool: Spool, deliveries: list[Delivery], bridge_id: str) -> list[str]:
    """Publish outcomes into the spool together, durable with one fsync of each directory
    (spool.write_outcomes: group commit); the ids whose outcome the spool holds now, whoever
    wrote it (the first outcome of an id stands). A task retried here since its outcome was
    written (by a bridge that died before marking it delivered) is a new run: it goes back to
    pending/, to be forwarded as one, and this outcome counts as delivered."""
    placed, fenced = [], []
    claims = _claim_entries(spool)
    for delivery in deliveries:
        if spool.outcome_state(delivery.task_id) is not None:
            placed.append(delivery.task_id)
            continue
        claim = _claim_for(spool, delivery.task_id, bridge_id, claims)
        if claim is None:
            continue  # moved while we looked, or run here now: the next delivery round looks
        if _retried_since(spool, claim, delivery.run):
            spool.requeue(claim.file_name, None)
            placed.append(delivery.task_id)
            continue
        mark = {"run": delivery.run} | ({"host": delivery.host} if delivery.host else {})
        outcome = spool.fence(claim, delivery.task_id,
                              {**delivery.outcome, CLUSTER_FIELD: mark})
        if outcome is not None:
            fenced.append(outcome)
    spool.write_outcomes(fenced)
    return placed + [outcome.task_id for outcome in fenced if _settled(spool, outcome)]


def _settled(spool: Spool, outcome: Outcome) -> bool:
    """Whether a written outcome stands (its finishing claim then removed); a disk that refused
    it leaves the bridge's claim as it was, for the next delivery round."""
    try:
        if spool.settle(outcome):
            spool.unmark(outcome)
            return True
    except OSError as exc:
        log.warning("cluster outcome of %s not written: %s", outcome.task_id, exc)
        return False
    return spool.outcome_state(outcome.task_id) is not None


def _retried_since(spool: Spool, claim: Claim, run: int) -> bool:
    """Whether a claimed face is a retry of `run` or of a later run: its outcome was delivered
    here before. Only a file that names a cluster run is decoded."""
    try:
        data = spool.read_claim(claim)[0]
    except (OSError, Refused, Unavailable):
        return False  # unreadable: the outcome goes in, as for any face
    if b'"' + CLUSTER_FIELD.encode() + b'"' not in data:
        return False
    try:
        raw = task_format.decode(data)
    except InvalidTask:
        return False
    given = delivered_run(raw) if isinstance(raw, dict) else None
    return given is not None and given >= run


def _claim_entries(spool: Spool) -> dict[str, str]:
    """The claims in in_progress/ by task file name, read once for a whole delivery round."""
    return {match["name"]: entry for entry, match in spool.claims()}


def _claim_for(spool: Spool, task_id: str, bridge_id: str,
               claims: dict[str, str]) -> Claim | None:
    """The bridge's claim on the local entry of a task: its own, a dead bridge's taken over,
    or the pending file claimed (recovery put a dead bridge's claim back there). A worker's
    claim is never taken: the task runs here (retried here since), its own outcome to come."""
    name = f"{task_id}.json"
    if name in claims:
        state, entry = "in_progress", claims[name]
    elif os.path.lexists(spool.pending / name):
        state, entry = "pending", name
    else:
        state, entry = _found(spool, task_id)
    if state == "pending":
        return spool.claim(entry, bridge_id)
    # A file in in_progress/ that is no claim (put there by hand) is nobody's to take over.
    if state == "in_progress" and (match := CLAIM_RE.fullmatch(entry)) and \
            not match["fin"] and match["worker"].startswith(BRIDGE_PREFIX):
        return spool.take_over(entry, bridge_id)
    return None


def adopt_faces(spool: Spool, bridge_id: str, lease_s: float) -> list[Task]:
    """Take over the faces dead bridges of this home left (recovery leaves them to the next
    bridge while cluster.dsn_env is set); the tasks adopted. One whose outcome its bridge was
    delivering when it died keeps that outcome, and is no face any more. What becomes of the
    others is what becomes of any face: the next full look at the cluster's rows decides."""
    adopted = []
    try:
        orphans = spool.orphaned_claims(lease_s)
    except OSError as exc:  # in_progress/ unreadable now: the next heartbeat looks again
        log.warning("the faces dead bridges left cannot be looked for: %s", exc)
        return []
    for entry, _ in orphans:
        match = CLAIM_RE.fullmatch(entry)
        if match["worker"] == bridge_id or not match["worker"].startswith(BRIDGE_PREFIX):
            continue
        claim = None
        try:
            claim = spool.take_over(entry, bridge_id)
            if claim is None or (match["fin"] and delivered_face(spool, claim)):
                continue
        except OSError as exc:  # back under its dead bridge's name, for the next heartbeat
            log.warning("the face of %s left by a dead bridge: %s", match["name"], exc)
            if claim is not None:
                give_back(spool, claim, entry)
            continue
        try:
            adopted.append(task_format.parse(spool.read_claim(claim)[0],
                                             task_format.id_from_name(claim.name)))
        except (OSError, Refused, Unavailable, InvalidTask) as exc:  # adopted, unread
            log.warning("the face of %s left by a dead bridge cannot be read: %s",
                        match["name"], exc)
    return adopted


def bring_home(spool: Spool, cluster: Cluster, bridge_id: str, craftsmen: list[str],
               granted: int, *, pending_too: bool = True) -> list[str]:
    """Run here again the tasks this host forwarded for these craftsmen that no host has
    taken: a worker of theirs is back. Only tasks whose face is here (a bridge's claim, or the
    file in pending/ where recovery put a dead bridge's claim) are asked for, never one a
    worker here has claimed (it runs already). Each leaves the cluster first, so that no host
    leases it after, then a face still claimed goes back to pending/ with the attempts it spent
    there counted (`granted`: the max_attempts it was forwarded with); the ids brought home. A
    crash between the two leaves the face to the next bridge (adopt_faces); a face this home
    cannot requeue now is said and stays claimed. Without `pending_too` only
    the bridges' claims are looked at (not a listing of pending/), and a face whose row is gone
    (a withdraw committed whose reply was lost) is not looked for."""
    faces = {task_format.id_from_name(match["name"]): entry for entry, match in spool.claims()
             if match["worker"].startswith(BRIDGE_PREFIX) and not match["fin"]}
    waiting = {task_format.id_from_name(name)
               for name in (os.listdir(spool.pending) if pending_too else ())}
    ids = sorted(i for i in (faces.keys() | waiting) if i is not None)
    withdrawn = cluster.withdraw(craftsmen, granted, ids)
    if pending_too:  # a face whose row is gone (a withdraw whose reply was lost) comes home too
        rows = cluster.states(faces)
        withdrawn |= {i: 0 for i in faces if i not in rows and i not in withdrawn}
    home = []
    for task_id, spent in sorted(withdrawn.items()):
        if task_id not in faces:
            home.append(task_id)  # in pending/ already: a worker here takes it
            continue
        claim = spool.take_over(faces[task_id], bridge_id)
        if claim is None:
            continue  # moved meanwhile (a cancel): that outcome stands
        attempts = _attempts(spool, claim) + spent if spent else None
        try:
            if spool.requeue(claim.file_name, attempts):
                home.append(task_id)
        except OSError as exc:
            log.warning("%s left the cluster to come home but could not be queued here: %s",
                        task_id, exc)
    return home


def _attempts(spool: Spool, claim: Claim) -> int:
    """The attempts a claimed task file says it has had; 0 if it does not say."""
    try:
        attempts = task_format.decode(spool.read_claim(claim)[0]).get("attempts")
    except (OSError, Refused, Unavailable, ValueError, AttributeError):
        return 0
    return attempts if isinstance(attempts, int) and attempts >= 0 else 0


def _found(spool: Spool, task_id: str) -> tuple[str, str]:
    """(state, entry) of a task dropped under another name than its id: the spool's full
    lookup, which reads the queued files; ("", "") when it is nowhere."""
    try:
        found = spool.find(task_id)
    except TaskNotFound:
        log.warning("cluster outcome of %s has no task in %s; it stays undelivered", task_id,
                    spool.home)
        return "", ""
    return found.state, found.path.name


# --- the serving host's half ---------------------------------------------------------------------

class TakeInRefused(Exception):
    """This home could not queue some leased tasks (`cause`: the disk full, pending/ unusable);
    their leases went back uncounted. `taken`: the leases whose tasks it did queue, still
    held; `size`: the bytes of the biggest task refused."""

    def __init__(self, cause: OSError, taken: list[ClusterClaim], size: int = 0) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.taken = taken
        self.size = size


def take_in(spool: Spool, cluster: Cluster, bridge_id: str, craftsman: str,
            limit: int) -> list[ClusterClaim]:
    """Lease up to `limit` cluster tasks of a craftsman in one statement and queue them in
    this home's pending/ together (one group commit), pinned to it; the leases queued. A task
    already in this home (an earlier lease of it ran here) is not queued again, unless what is
    here is the outcome of an older run that this run did not adopt (_adopt_unfinished). One
    that is no valid task here fails under its lease as invalid, for its origin's failed/.
    TakeInRefused when the home refuses some of them: their leases go back uncounted, the
    others are held and named in it."""
    claims = cluster.claim_many(bridge_id, [craftsman], limit, others_only=True)
    if not claims:
        return []
    queued, invalid = _as_queued_all(claims)
    try:
        cluster.publish_many([(claim, _invalid_outcome(claim, exc, cluster.host))
                              for claim, exc in invalid])
        queued = _adopt_unfinished(spool, cluster, queued)
    except BaseException:
        cluster.requeue_many([claim for claim, _ in queued], counted=False)
        raise
    rerun, fresh, refused = _queue_reruns(spool, cluster, queued)
    try:
        submitted = spool.submit([task for _, task in fresh])
    except BaseException as exc:
        # The leases back at once rather than after lease_s, and uncounted: nothing ran.
        cluster.requeue_many([claim for claim, _ in fresh], counted=False)
        if not isinstance(exc, OSError):
            raise
        refused, fresh, submitted = refused or exc, [], []
    fresh = _refuse_ids_of_others(spool, cluster, fresh, submitted)
    taken = rerun + [claim for claim, _ in fresh]
    if refused is not None:
        kept = {claim.task_id for claim in taken}
        raise TakeInRefused(refused, taken, max(
            (len(claim.body) for claim, _ in queued if claim.task_id not in kept), default=0))
    return taken


def _refuse_ids_of_others(spool: Spool, cluster: Cluster, fresh: list[tuple[ClusterClaim, Task]],
                          submitted: list[tuple[Task, str, bool]]
                          ) -> list[tuple[ClusterClaim, Task]]:
    """The taken-in tasks, less those whose id is another task's here: one of this home's own
    (never forwarded) or one taken in from another origin. The submit left that task as it is,
    and its outcome would answer this one, content and all; each such lease fails as invalid
    instead, for its origin's failed/."""
    others, refusals = set(), []
    for (claim, task), (_, _, new) in zip(fresh, submitted, strict=True):
        here = None if new else _origin_here(spool, task.id)  # "": this home's own
        if here in (claim.origin, None):
            continue
        whose = f"from host {here}" if here else "its own"
        others.add(claim.task_id)
        refusals.append((claim, _invalid_outcome(claim, InvalidTask(
            f"host {cluster.host} has another task under the id {claim.task_id} ({whose}); "
            "ids are unique across the cluster's hosts: submit this one under another id"),
            cluster.host)))
    try:
        cluster.publish_many(refusals)
    except ClusterUnavailable:  # the tasks are queued: those leases run out, come back, fail
        log.warning("could not fail %d lease(s) whose id is taken here: the cluster is "
                    "unreachable; they are refused when they come back", len(others))
    return [(claim, task) for claim, task in fresh if claim.task_id not in others]


def _origin_here(spool: Spool, task_id: str) -> str | None:
    """The host the task of this id here (pending, claimed or finished) was taken in from; ""
    for a task of this home's own; None when it is not here or cannot be read."""
    try:
        found = spool.find(task_id)
        obj = task_format.decode(spool.read_entry(found.path.parent, found.path.name)[0])
    except (TaskNotFound, InvalidTask, Refused, Unavailable, OSError, ValueError):
        return None
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    return str(metadata.get(FROM_KEY, "")) if isinstance(metadata, dict) else ""


def _adopt_unfinished(spool: Spool, cluster: Cluster, queued: list[tuple[ClusterClaim, Task]]
                      ) -> list[tuple[ClusterClaim, Task]]:
    """Record in the cluster each retried task this home still has pending or running in an
    older run: the submit leaves that copy as it is, and its outcome answers this run. Recorded
    before the submit: a lease of this run lost and taken here again then sends that outcome
    back, rather than running the task once more. The queued tasks, the adopted marked."""
    adoptions = []
    for claim, task in queued:
        older = _unfinished_run(spool, task.id) if claim.run else None
        if older is not None and older < claim.run:
            adoptions.append((claim, older))
    cluster.adopt(adoptions)
    adopted = {claim.task_id: older for claim, older in adoptions}
    return [(dataclasses.replace(claim, adopted=adopted[claim.task_id])
             if claim.task_id in adopted else claim, task) for claim, task in queued]


def _unfinished_run(spool: Spool, task_id: str) -> int | None:
    """The run of the cluster task of this id pending or running in this home, if one is.
    Looked for in the order a task moves (pending/, then in_progress/), and once more when it
    moved on meanwhile; None when it is not here, finished (the rerun path sees to that) or
    cannot be read. Not Lookups.find: a task not here would have every queued file read."""
    name = f"{task_id}.json"

    def entries():
        yield spool.pending, name
        yield from ((spool.in_progress, entry) for entry, match in spool.claims()
                    if match["name"] == name)
    for _ in range(2):
        for directory, entry in entries():
            try:
                obj = task_format.decode(spool.read_entry(directory, entry)[0])
            except Refused as exc:
                if exc.gone:
                    continue
                return None
            except (Unavailable, ValueError):
                return None
            metadata = obj.get("metadata") if isinstance(obj, dict) else None
            if not isinstance(metadata, dict) or FROM_KEY not in metadata:
                return None
            run = metadata.get(RUN_KEY, 0)
            return run if isinstance(run, int) else None
    return None


def _queue_reruns(spool: Spool, cluster: Cluster, queued: list[tuple[ClusterClaim, Task]]
                  ) -> tuple[list[ClusterClaim], list[tuple[ClusterClaim, Task]], OSError | None]:
    """Queue the retried tasks that replace an older run's outcome here, each on its own; the
    leases so queued, the tasks left for the common submit, and the first refusal (its lease
    given back uncounted, nothing changed here: Spool.rerun puts things back)."""
    rerun, fresh, refused = [], [], None
    for claim, task in queued:
        try:
            if claim.run and _replace_older_run(spool, task, claim.run, claim.adopted):
                rerun.append(claim)
                continue
        except OSError as exc:
            cluster.requeue_many([claim], counted=False)
            refused = refused or exc
            continue
        fresh.append((claim, task))
    return rerun, fresh, refused


def _as_queued_all(claims: list[ClusterClaim]) -> tuple[list[tuple[ClusterClaim, Task]],
                                                        list[tuple[ClusterClaim, InvalidTask]]]:
    """The leased tasks as this home queues them, and those whose body is no valid task here
    (an origin of another koubou version, say), with the reason."""
    queued, invalid = [], []
    for claim in claims:
        try:
            queued.append((claim, _as_queued(claim)))
        except InvalidTask as exc:
            invalid.append((claim, exc))
    return queued, invalid


def _invalid_outcome(claim: ClusterClaim, exc: InvalidTask, host: str) -> dict:
    """The failed outcome of a cluster task that is no valid task on this host: every field
    of it that can be read, its error kind `invalid`."""
    try:
        sent = task_format.decode(claim.body)
    except InvalidTask:
        sent = None
    fields = {**(sent if isinstance(sent, dict) else {}), "id": claim.task_id}
    log.warning("cluster task %s from %s is no valid task here: %s", claim.task_id,
                claim.origin, exc)
    return task_format.failed_record(fields, "invalid", f"host {host} refused it, not run: "
                                     f"{exc}", claim.attempt, time.time())


def _as_queued(claim: ClusterClaim) -> Task:
    """A leased task as this home queues it: pinned to its craftsman, marked as come from the
    cluster (so that this home's bridge never forwards it back out) in this run of its row."""
    obj = task_format.decode(claim.body)
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata") or {}, dict):
        task_format.validate(obj)  # no shape to add this host's marks to: it names the fault
    obj["craftsman"] = claim.craftsman
    obj["metadata"] = {**(obj.get("metadata") or {}), FROM_KEY: claim.origin,
                       RUN_KEY: claim.run}
    return task_format.validate(obj)


def _replace_older_run(spool: Spool, task: Task, run: int, adopted: int | None) -> bool:
    """Queue a retried task in place of the outcome an older run of it left here; whether it
    did. That outcome went to its origin already; sent back again, it would answer the retry
    with the old result. A lease lost after its run finished here comes back in the same run,
    and is sent back; so is the outcome of the older run this run `adopted` here. An outcome
    this host cannot read is left to the usual path (sent back as it is, or failing there),
    never a reason to stop the bridge."""
    try:
        record = spool.outcome(task.id)
    except (ValueError, TaskNotFound) as exc:  # torn by hand, say: it stays as it is
        log.warning("the outcome of %s here cannot be read (%s); not run again", task.id, exc)
        return False
    metadata = record.get("metadata") if isinstance(record, dict) else None
    if not isinstance(metadata, dict) or FROM_KEY not in metadata:
        return False  # nothing finished here, or a task of this home's own under the same id
    older = metadata.get(RUN_KEY, 0)
    if not isinstance(older, int) or older >= run or older == adopted:
        return False
    try:
        found = spool.find(task.id)
    except TaskNotFound:
        return False  # purged meanwhile: queued as a new task
    return spool.rerun(found, task)


def send_back(spool: Spool, cluster: Cluster, leases: dict[str, ClusterClaim]) -> set[str]:
    """Publish the local outcomes of the leases whose tasks finished here, in one statement,
    and forget those leases (published, or fenced out because revoked); the ids published."""
    names = {f"{task_id}.json": task_id for task_id in leases}
    finished = [names[name] for name in spool.outcome_states(names)]
    outcomes = []
    for task_id in finished:
        record = spool.outcome(task_id)
        if record is not None:  # gone meanwhile: nothing to send, the lease ends all the same
            outcomes.append((leases[task_id], _as_sent(record, leases[task_id])))
    published = cluster.publish_many(outcomes)
    for task_id in finished:  # only once published: a lost connection keeps them for later
        del leases[task_id]
    return published


def _as_sent(record: dict, lease: ClusterClaim) -> dict:
    """The outcome with the task's metadata as its origin sent it (take_in's mark removed)."""
    sent = task_format.decode(lease.body)
    record = dict(record)
    if "metadata" in sent:
        record["metadata"] = sent["metadata"]
    else:
        record.pop("metadata", None)
    return record


def renew(cluster: Cluster, bridge_id: str, leases: dict[str, ClusterClaim]) -> list[str]:
    """Renew every lease this bridge holds (its heartbeat); forget and name the revoked."""
    revoked = cluster.heartbeat(bridge_id, leases.values())
    for claim in revoked:
        leases.pop(claim.task_id, None)
    return [claim.task_id for claim in revoked]
