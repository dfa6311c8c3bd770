"""The origin's half of the bridge between a home's file spool and the cluster (docs/CLUSTER.md,
"A task's path across hosts", steps 1 and 5).

`forward` takes a pending task out to the cluster: a local claim by the bridge (the file
spool's rename, so one owner) and an idempotent insert. The claim stays in in_progress/ as the
task's face on its host until `deliver` publishes the outcome into it: completed/ or failed/,
fsynced, and only then marked delivered in the database. Both are safe to run again after a
crash at any point: an insert of an id already there inserts nothing, and an outcome already
in the spool is only marked.

Not yet here: the choice of which tasks leave (routing, and the craftsmen each host serves),
the process that runs these on inotify and NOTIFY, and the serving host's half.
"""

from __future__ import annotations

import logging

from ..errors import TaskNotFound
from . import task as task_format
from .cluster import Cluster, Delivery, Submission
from .entries import Claim
from .files import Spool

log = logging.getLogger(__name__)


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

