"""The origin's half of the bridge between a home's file spool and the cluster (docs/CLUSTER.md,
"A task's path across hosts", steps 1 and 5).

`forward` takes a pending task out to the cluster: a local claim by the bridge (the file
spool's rename, so one owner) and an idempotent insert. The claim stays in in_progress/ as the
task's face on its host until `deliver` publishes the outcome into it: completed/ or failed/,
fsynced, and only then marked delivered in the database. Both are safe to run again after a
crash at any point: an insert of an id already there inserts nothing, and an outcome already
in the spool is only marked.

The serving host's half: `take_in` leases a cluster task of a craftsman this host serves and
queues it in its own pending/, pinned to that craftsman, where its workers run it as any task;
`send_back` publishes the local outcomes of the leases held, fenced by (id, attempt); `renew`
keeps the leases alive meanwhile and drops the revoked ones. A task whose lease was lost and
that comes back to this host finds its local outcome and is sent back without a second run.

The process that runs all this on inotify, NOTIFY and a heartbeat, and chooses which tasks
leave, is service/bridging.py (`koubou cluster`).
"""

from __future__ import annotations

import logging

from ..errors import TaskNotFound
from . import task as task_format
from .cluster import Cluster, ClusterClaim, Delivery, Submission
from .entries import Claim
from .files import Spool

log = logging.getLogger(__name__)

FROM_KEY = "koubou_cluster_from"  # in a taken-in task's metadata: the host it came from


def taken_in(task: task_format.Task) -> bool:
    """Whether a task was queued here by take_in: it runs here, it never leaves again."""
    return isinstance(task.raw.get("metadata"), dict) and FROM_KEY in task.raw["metadata"]


def forward(spool: Spool, cluster: Cluster, name: str, craftsman: str, bridge_id: str,
            max_attempts: int = 3) -> str | None:
    """Send pending/<name> to the cluster for `craftsman`; its id, or None when a worker of
    this home took it first. InvalidTask (and the file back in pending/, to be rejected there)
    when it is no task; ClusterUnavailable (and the file back in pending/) when the database
    cannot be reached: it waits there, as any task does."""
    claim = spool.claim(name, bridge_id)
    if claim is None:
        return None
    try:
        data, _ = spool.read_claim(claim)
        task = task_format.parse(data, default_id=task_format.id_from_name(name))
        cluster.submit([Submission(task, craftsman, max_attempts)])
    except BaseException:
        # Back uncounted: the bridge's claim is no attempt. A commit whose reply was lost is
        # harmless: the next forward of the same id inserts nothing.
        spool.requeue(claim.file_name, None)
        raise
    return task.id


def deliver(spool: Spool, cluster: Cluster, bridge_id: str, limit: int = 500) -> list[str]:
    """Write this host's finished cluster tasks into its spool, then mark them delivered; the
    ids delivered. A host that was down gets everything undelivered when it comes back."""
    placed = [d.task_id for d in cluster.undelivered(limit) if place(spool, d, bridge_id)]
    if placed:
        cluster.mark_delivered(placed)
    return placed


def place(spool: Spool, delivery: Delivery, bridge_id: str) -> bool:
    """Publish one outcome into the spool (durably: spool.publish fsyncs); True when the spool
    holds an outcome for the task now, whoever wrote it (the first outcome of an id stands)."""
    if spool.outcome_state(delivery.task_id) is not None:
        return True
    claim = _claim_for(spool, delivery.task_id, bridge_id)
    if claim is None:
        return False  # moved while we looked: the next delivery round takes it
    if spool.publish(claim, delivery.task_id, delivery.outcome):
        return True
    return spool.outcome_state(delivery.task_id) is not None


def _claim_for(spool: Spool, task_id: str, bridge_id: str) -> Claim | None:
    """The bridge's claim on the local entry of a task: its own, a dead bridge's taken over,
    or the pending file claimed (recovery put a dead bridge's claim back there)."""
    try:
        found = spool.find(task_id)
    except TaskNotFound:
        log.warning("cluster outcome of %s has no task in %s; it stays undelivered", task_id,
                    spool.home)
        return None
    entry = found.path.name
    if found.state == "pending":
        return spool.claim(entry, bridge_id)
    if found.state == "in_progress" and not entry.endswith(".fin"):
        return spool.take_over(entry, bridge_id)
    return None



# --- the serving host's half ---------------------------------------------------------------------

def take_in(spool: Spool, cluster: Cluster, bridge_id: str,
            craftsmen: list[str]) -> ClusterClaim | None:
    """Lease one cluster task of these craftsmen and queue it in this home's pending/, pinned
    to the craftsman it was routed to; the lease, or None when none waits. A task already in
    this home (an earlier lease of it ran here) is not queued again."""
    claim = cluster.claim(bridge_id, craftsmen)
    if claim is None:
        return None
    obj = task_format.decode(claim.body)
    obj["craftsman"] = claim.craftsman
    # Marked as come from the cluster, so this home's bridge never forwards it back out.
    obj["metadata"] = {**(obj.get("metadata") or {}), FROM_KEY: claim.origin}
    try:
        spool.submit([task_format.validate(obj)])
    except BaseException:
        cluster.requeue(claim)  # the lease back at once rather than after lease_s
        raise
    return claim


def send_back(spool: Spool, cluster: Cluster, leases: dict[str, ClusterClaim]) -> list[str]:
    """Publish the local outcome of each lease whose task finished here, and forget those
    leases (published, or fenced out because revoked); the ids published."""
    names = {f"{task_id}.json": task_id for task_id in leases}
    published = []
    for name in spool.outcome_states(names):
        task_id = names[name]
        record = spool.outcome(task_id)
        if record is not None and cluster.publish(leases[task_id], _as_sent(record,
                                                                            leases[task_id])):
            published.append(task_id)
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
