"""`koubou cluster`: the bridge between this home's file spool and the cluster's PostgreSQL
(docs/CLUSTER.md), one process per home, beside its workers.

It runs the halves of spool/bridge.py:

- out: a pending task routed to a craftsman that no live worker of this home serves is
  forwarded (a local claim by the bridge, an idempotent insert) and its outcome, once some host
  has published it, is delivered into completed/ or failed/ (fsynced, then marked delivered);
- in: cluster tasks of the craftsmen this host serves for the cluster are taken in, at most
  as many of each craftsman as its max_concurrent leaves room for beside this home's own tasks
  of it, queued in pending/ for this home's workers;
  their leases are renewed with the heartbeat and their outcomes sent back, fenced by attempt.

Nothing polls. The loop sleeps in select(2) (service/bridge_wakeups.py) on inotify (pending/,
completed/, failed/), on a pipe the listener thread writes to when a NOTIFY (or a reconnect's
one re-check) comes, and on the heartbeat's timeout. While PostgreSQL cannot be reached the
bridge says so once a minute, keeps its local claims alive, and tries again at each heartbeat
and when the listener is back; local work never waits for it.
"""

from __future__ import annotations

import heapq
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..config import ClusterSettings, Config
from ..craft import router
from ..errors import InvalidTask, KoubouError, UsageError
from ..observe.cluster_view import Snapshots
from ..observe.status import served_craftsmen
from ..spool import bridge, disk
from ..spool import task as task_format
from ..spool.task import Task
from ..spool.cluster import CONNECT_TIMEOUT_S, Cluster, ClusterClaim, ClusterUnavailable
from ..spool.cluster_hosts import Board
from ..spool.entries import BRIDGE_PREFIX, CLAIM_RE, Refused, Unavailable
from ..spool.files import Spool, new_worker_id
from .bridge_wakeups import BridgeWakeups, Events
from .control import NotCancelled, cancel

log = logging.getLogger(__name__)

DOWN_LOG_S = 60.0  # while the cluster is unreachable, say so this often
DUE_SLACK_S = 0.05  # past a task's not_before, so that its take-in finds it due
DELIVER_BATCH = 500
# Tasks in one forwarding statement: a round's usual few in one, and a backlog found after an
# outage (tasks of up to spool.max_task_bytes each) not in one statement of any size.
FORWARD_BATCH = 500
ROOM_PROBE_BYTES = 4096  # after a refused take-in: a block written and removed, to see room
_UNREAD = object()  # a claim in in_progress/ not read yet


def cluster_dsn(settings: ClusterSettings) -> str:
    """The DSN from the variable cluster.dsn_env names; UsageError when unset."""
    if not settings.dsn_env:
        raise UsageError("this home has no cluster: set cluster.dsn_env in its config to the "
                         "name of the variable that holds the PostgreSQL DSN")
    dsn = os.environ.get(settings.dsn_env)
    if not dsn:
        raise UsageError(f"cluster.dsn_env names {settings.dsn_env}, which is not set in this "
                         "environment; export the cluster's PostgreSQL DSN in it")
    return dsn


class Bridge:
    """One home's bridge process. `run` serves until SIGTERM or SIGINT and returns 0."""

    def __init__(self, home: Path, config: Config) -> None:
        self.config = config
        self.settings = ClusterSettings.parse(config.cluster)
        self.dsn = cluster_dsn(self.settings)
        self.spool = Spool.open(home, config.spool)
        self.id = BRIDGE_PREFIX + new_worker_id()
        self.cluster = Cluster(self.dsn, host=self.settings.host, lease_s=self.settings.lease_s)
        self.leases: dict[str, ClusterClaim] = {}  # taken in: task id -> its lease
        # Revoked leases whose rows were not read yet (the read failed): a cancelled one's
        # local copy must still be stopped once the cluster answers again.
        self.unread: set[str] = set()
        self.up = False  # the last database call succeeded
        self.down_logged = -DOWN_LOG_S
        self.stopping = False
        # The home refused the tasks of a take-in (a full disk, an unusable pending/): none
        # until the next heartbeat, not at each NOTIFY (giving the leases back sends one,
        # which would bring them straight back).
        self.held_back = False
        self.refused_logged = -DOWN_LOG_S  # monotonic: when a refused take-in was last said
        self.room_needed = ROOM_PROBE_BYTES  # what the next probe of room writes
        self.unread_logged = -DOWN_LOG_S  # monotonic: when this home's snapshot last failed
        self.served: set[str] = set()
        self.local = LocalWork(self.spool, config)  # this home's own tasks, for take-ins
        self.local_counted = False  # the last take-in counted tasks of this home's own
        self.due_at: float | None = None  # monotonic: a not_before task of the cluster is due
        # Forwarded tasks with an expires_at, for their origin to fail if none has started:
        # (expires_at, id) earliest first, and the task by id while it is undelivered.
        self.deadlines: list[tuple[float, str]] = []
        self.expiring: dict[str, Task] = {}
        self.wakeups = BridgeWakeups(self.spool, self.dsn, self.settings.host)
        self.board = Board(self.dsn, connect_timeout=CONNECT_TIMEOUT_S)  # this host's row
        self.ledger_path = home / "db" / "koubou.db"
        self.snapshots = Snapshots(self.spool, self.ledger_path, config)
        self._lock_fd = -1

    # --- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        """Serve, holding run/bridge.lock: two bridges in one home would each forward and
        take in, and each adopt the other's claims as a dead bridge's."""
        lock = FileLock(str(self.spool.home / "run" / "bridge.lock"), mode=0o600)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise UsageError(f"another bridge serves this home already ({self._other_bridge()}): "
                             "one `koubou cluster` per home") from None
        try:
            return self._serve()
        finally:
            lock.release()

    def _other_bridge(self) -> str:
        """'pid N' of the live bridge registered in this home, or 'still starting' before it is."""
        for worker_id in self.spool.live_bridges():
            info = self.spool.worker_info(worker_id)
            if isinstance(info, dict) and isinstance(info.get("pid"), int):
                return f"pid {info['pid']}"
        return "still starting"

    def _serve(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._lock_fd = self.spool.register_worker(self.id, {
            "id": self.id, "role": "bridge", "host": self.settings.host, "pid": os.getpid(),
            "started_at": task_format.iso(time.time())})
        self.wakeups.start()
        log.info("bridge %s of host %s in %s", self.id, self.settings.host, self.spool.home)
        heartbeat_s = self.config.spool.heartbeat_s
        self.served = served_craftsmen(self.spool)
        try:
            self._adopt()  # the first round looks at every face, these with the others
            if self._connect():
                self._round(Events(rescan=True, outcomes=True, flags={"recheck"}))
            next_beat = time.monotonic() + heartbeat_s
            while not self.stopping:
                events = self.wakeups.wait(self._until_next(next_beat))
                if self.due_at is not None and time.monotonic() >= self.due_at:
                    self.due_at = None
                    events.flags.add("due")  # a task's not_before has come: nothing else says so
                if self.deadlines and self.deadlines[0][0] <= time.time():
                    events.flags.add("expire")
                beat = time.monotonic() >= next_beat
                if beat:
                    next_beat = time.monotonic() + heartbeat_s
                    if self._beat() or self.local_counted:
                        # Leases ended at the beat, or this home's own work may have (a task
                        # removed from pending/ by hand says nothing): room to take in.
                        events.flags.add("freed")
                    if self._adopt():
                        events.flags.add("adopted")
                    if self._served_changed():
                        events.rescan = True
                        events.flags.add("served")
                        self._release_unserved()
                if self.stopping:
                    break
                if not self.up or "recheck" in events.flags:
                    # Reconnect at a heartbeat or when the listener is back, not at each event;
                    # what happened meanwhile is looked at once, whole.
                    if not (beat or "recheck" in events.flags) or not self._connect():
                        continue
                    events.flags.add("recheck")
                    events.rescan = events.outcomes = True
                self._round(events)
        finally:
            self.wakeups.close()
            self.cluster.close_quietly()
            self.board.close()
            self.spool.unregister_worker(self.id, self._lock_fd)
        log.info("bridge %s stopped", self.id)
        return 0

    def _until_next(self, next_beat: float) -> float:
        """Seconds to wait: until the heartbeat, a not_before due, or a deadline."""
        wait = next_beat - time.monotonic()
        if self.due_at is not None:
            wait = min(wait, self.due_at - time.monotonic())
        if self.deadlines and self.up:  # while the cluster is away, the heartbeat retries
            wait = min(wait, self.deadlines[0][0] - time.time() + DUE_SLACK_S)
        return max(0.0, wait)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True
        self.wakeups.stop()

    # --- one round ---------------------------------------------------------------------------

    def _round(self, events: Events) -> None:
        """Forward what came into pending/, deliver what the cluster finished for this host,
        send back what finished here, take in what fits."""
        names, flags = events.names, events.flags
        try:
            wanted = {flag[len("tasks:"):] for flag in flags if flag.startswith("tasks:")}
            # A worker here came back, or a task of a craftsman served here went back to
            # pending in the cluster (a host gave it back, or died): if it is ours, home.
            full_look = bool(flags & {"recheck", "served", "adopted"})
            if full_look or wanted & self.served:
                self._bring_home(pending_too=full_look)
            if events.rescan:
                names = set(os.listdir(self.spool.pending))
            if names:
                self._forward(sorted(names))
            if flags & {"recheck", "outcomes"}:
                self._deliver()
            if events.rescan:  # the first look, or inotify overflowed: events may be lost
                events.failed |= self._failed_while_unseen()
            if events.failed:
                self._cancel_forwarded(events.failed)
            if "expire" in flags and self._expire_due():
                self._deliver()  # their failed outcomes, as the cluster's
            if "cancel" in flags or self.unread:
                self._leases_ended(bridge.renew(self.cluster, self.id, self.leases))
            freed = self._send_back() if events.outcomes and self.leases else 0
            # An outcome here may also end the home's own work the last take-in counted.
            if (freed or flags & {"recheck", "served", "freed", "due"}
                    or (events.outcomes and self.local_counted)
                    or wanted & set(self._serving())):
                self._take_in()
        except ClusterUnavailable as exc:
            self._down(exc)

    def _forward(self, names: list[str]) -> None:
        """Forward the pending tasks of these that leave, FORWARD_BATCH to a transaction."""
        local = served_craftsmen(self.spool)
        leaving = []
        for name in names:
            if self.stopping:
                return
            craftsman = self._leaving(name, local)
            if craftsman is not None:
                leaving.append((name, craftsman))
        for start in range(0, len(leaving), FORWARD_BATCH):
            sent = bridge.forward(self.spool, self.cluster, leaving[start:start + FORWARD_BATCH],
                                  self.id, self.config.spool.max_attempts)
            for task in sent:
                self._mind_deadline(task)
            if sent:
                log.info("forwarded %d task(s) to the cluster: %s", len(sent),
                         ", ".join(task.id for task in sent[:5]))

    def _mind_deadline(self, task: Task) -> None:
        """A forwarded task with an expires_at: failed here if no host has started it by then."""
        if task.expires_at is not None:
            heapq.heappush(self.deadlines, (task.expires_at, task.id))
            self.expiring[task.id] = task

    def _adopt(self) -> bool:
        """Take over the faces a dead bridge of this home left (recovery leaves them to this
        bridge); whether there were any."""
        adopted = bridge.adopt_faces(self.spool, self.id, self.config.spool.lease_s)
        for task in adopted:
            self._mind_deadline(task)
        if adopted:
            log.info("adopted %d face(s) of tasks a dead bridge forwarded: %s", len(adopted),
                     ", ".join(task.id for task in adopted[:5]))
        return bool(adopted)

    def _bring_home(self, pending_too: bool) -> None:
        """Forwarded tasks no host holds whose craftsman a live worker here serves now (it came
        back, this bridge started after it did, or a host gave such a task back) come home and
        run here: without this, only another host serving their craftsman would run them."""
        home = bridge.bring_home(self.spool, self.cluster, self.id, sorted(self.served),
                                 self.config.spool.max_attempts, pending_too=pending_too)
        for task_id in home:
            self.expiring.pop(task_id, None)
        if home:
            log.info("brought %d task(s) home from the cluster: %s", len(home),
                     ", ".join(home[:5]))

    def _expire_due(self) -> int:
        """Fail in the cluster the forwarded tasks past their expires_at that no host has
        started (one running decides for itself); how many."""
        expired, now = 0, time.time()
        while self.deadlines and self.deadlines[0][0] <= now:
            _, task_id = self.deadlines[0]
            task = self.expiring.get(task_id)
            if task is not None:
                record = task_format.failed_record(
                    task.raw, "expired", "not started before expires_at "
                    f"{task.raw.get('expires_at')}", task.attempts, now)
                if self.cluster.expire(task_id, record):  # ClusterUnavailable: it stays due
                    expired += 1
                    log.warning("failed %s (expired): no host started it before %s", task_id,
                                task.raw.get("expires_at"))
                del self.expiring[task_id]
            heapq.heappop(self.deadlines)
        return expired

    def _leaving(self, name: str, local: set[str]) -> str | None:
        """The craftsman a pending task goes to when no live worker here serves it; None when
        it stays (served here, come from the cluster, not a task, not readable yet)."""
        if name.startswith(".") or not name.endswith(".json"):
            return None
        try:
            data, _ = self.spool.read_entry(self.spool.pending, name)
            task = task_format.parse(data, default_id=task_format.id_from_name(name))
        except (OSError, Refused, Unavailable, InvalidTask):
            return None  # gone, or for a worker to reject with its reason
        if bridge.taken_in(task) or task.id in self.leases:
            return None
        try:
            route = router.route(task, self.config)
        except (InvalidTask, KoubouError):
            return None
        craftsman = route.craftsman
        if craftsman is None:
            return None  # for a worker to fail with its reason
        if craftsman in local and (task.not_before or 0) <= time.time() and not task.after:
            # This home's own work, ready to run: take-ins count it (not a task that waits
            # for its time or for other tasks: it may hold no slot for a long while).
            self.local.waiting[name] = craftsman
        # Local paths mean nothing on another host; confidential stays on its host (§4.7);
        # a craftsman served here, or said to be (a worker restarting), keeps its tasks.
        if (task.files or task.repo or route.confidential or craftsman in local
                or craftsman in (self.settings.serve or ())):
            return None
        return craftsman

    def _deliver(self) -> None:
        placed = bridge.deliver(self.spool, self.cluster, self.id, DELIVER_BATCH)
        for task_id in placed:
            self.expiring.pop(task_id, None)
        if placed:
            log.info("delivered %d outcome(s) from the cluster: %s", len(placed),
                     ", ".join(placed[:5]))

    def _send_back(self) -> int:
        """Send back the outcomes of taken-in tasks that finished here; how many leases that
        ended (sent, or fenced out)."""
        before = len(self.leases)
        sent = bridge.send_back(self.spool, self.cluster, self.leases)
        if sent:
            log.info("sent back %d outcome(s) to the cluster: %s", len(sent),
                     ", ".join(sorted(sent)[:5]))
        return before - len(self.leases)

    def _serving(self) -> list[str]:
        """The craftsmen this host takes cluster tasks in for now: those it serves for the
        cluster (all configured, unless cluster.serve says) that a live worker here serves."""
        wanted = self.settings.serve if self.settings.serve is not None else self.config.craftsmen
        return sorted(set(wanted) & self.served)

    def _take_in(self) -> None:
        """Lease tasks up to each craftsman's free slots: its max_concurrent, less the leases
        of it held. Bounded, so that the first host to look does not lease everything."""
        room: set[str] = set()
        try:
            while self._take_in_once(room) and self._send_back():
                pass  # a task that ran here under an earlier lease was done already: room again
        except ClusterUnavailable:
            raise
        except OSError as exc:  # the disk full, pending/ unusable: this home cannot queue now
            self.held_back = True
            self._say_refused(exc)
            return
        if not self.held_back:  # queued again: the next refusal is news
            self.refused_logged = -DOWN_LOG_S
        if room:
            self._mind_not_before(sorted(room))

    def _say_refused(self, exc: OSError) -> None:
        if time.monotonic() - self.refused_logged >= DOWN_LOG_S:
            self.refused_logged = time.monotonic()
            log.warning("%s; the cluster's tasks were given back, taken in again once this "
                        "home can queue them (said once a minute while it lasts)", exc)

    def _room_to_queue(self) -> bool:
        """After a take-in this home refused: whether it could queue the task refused now
        (pending/ a directory this process may write in, and a block of that task's size
        written and removed in tmp/). A disk still full then costs no lease at each
        heartbeat: each would spend an attempt number and give it back, thousands a day."""
        pending = self.spool.pending
        if not os.path.isdir(pending) or not os.access(pending, os.W_OK | os.X_OK):
            self._say_refused(OSError(f"{pending} is not a directory this bridge can write in"))
            return False
        try:
            os.unlink(disk.stage(self.spool.tmp, "room", bytes(self.room_needed), fsync=False,
                                 home=self.spool.home))
        except OSError as exc:
            self._say_refused(exc)
            return False
        return True

    def _mind_not_before(self, craftsmen: list[str]) -> None:
        """A timer for the first task of these craftsmen (which have room) held back by its
        not_before: no wake-up will come for it, its NOTIFY went out when it was submitted.
        A craftsman without room needs none: the end of a lease takes in again."""
        due_s = self.cluster.next_due_s(craftsmen)
        self.due_at = None if due_s is None else time.monotonic() + due_s + DUE_SLACK_S

    def _take_in_once(self, room: set[str]) -> int:
        """One take-in for each craftsman served; `room` gets those left with free slots."""
        taken = 0
        serving = self._serving()
        busy = self.local.count(serving)
        self.local_counted = any(busy.values())
        for craftsman in serving:
            held = sum(lease.craftsman == craftsman for lease in self.leases.values())
            free = self.config.craftsmen[craftsman].max_concurrent - held - busy[craftsman]
            if free <= 0 or self.stopping or self.held_back:
                room.discard(craftsman)
                continue
            try:
                leases = bridge.take_in(self.spool, self.cluster, self.id, craftsman, free)
            except bridge.TakeInRefused as refused:
                self.leases.update((lease.task_id, lease) for lease in refused.taken)
                self.room_needed = max(ROOM_PROBE_BYTES, refused.size)
                raise refused.cause from None
            self.leases.update((lease.task_id, lease) for lease in leases)
            taken += len(leases)
            if len(leases) < free:
                room.add(craftsman)
            else:
                room.discard(craftsman)
            if leases:
                log.info("took in %d task(s) of %s: %s", len(leases), craftsman, ", ".join(
                    f"{lease.task_id} from {lease.origin} (attempt {lease.attempt})"
                    for lease in leases[:5]))
        return taken

    # --- heartbeat and the connection ------------------------------------------------------------

    def _beat(self) -> bool:
        """Keep the local claims alive; renew the leases, take back expired ones anywhere;
        whether leases of this bridge ended (revoked, or sent back), leaving room to take in,
        or a take-in the disk refused may try again: no wake-up may come for the tasks still
        waiting, their NOTIFY was sent long ago."""
        now = time.time()
        os.utime(self._lock_fd, (now, now))
        retry = False
        if self.held_back:  # a take-in this home refused: again once it has room
            retry = self._room_to_queue()
            self.held_back = not retry
        if not self.up:
            return retry
        try:
            revoked = bridge.renew(self.cluster, self.id, self.leases)
            self._leases_ended(revoked)
            taken = self.cluster.take_back_expired()
            if taken:
                log.warning("took back %d expired lease(s) in the cluster", len(taken))
            self._publish_host()
            return retry or bool(revoked) or bool(self.leases and self._send_back())
        except ClusterUnavailable as exc:
            self._down(exc)
            return retry

    # --- cancels across hosts ------------------------------------------------------------------

    def _failed_while_unseen(self) -> set[str]:
        """The outcomes in failed/ of tasks forwarded and still open in the cluster: a cancel
        made while this bridge was not running, or whose event an overflow lost."""
        names = [f"{task_id}.json" for task_id in self.cluster.open_forwarded()]
        return {name for name, state in self.spool.outcome_states(names).items()
                if state == "failed"}

    def _cancel_forwarded(self, names: set[str]) -> None:
        """On the origin: end in the cluster the tasks of these outcomes that `koubou cancel`
        failed here while they were forwarded (the cancel took over this bridge's claim)."""
        for name in sorted(names):
            task_id = task_format.id_from_name(name) if name.endswith(".json") else None
            if task_id is None:
                continue
            record = self.spool.outcome(task_id)
            error = record.get("error") if isinstance(record, dict) else None
            if not (isinstance(error, dict) and error.get("kind") == "cancelled"):
                continue
            if self.cluster.cancel(task_id, record):
                log.info("cancelled %s in the cluster: it was cancelled here", task_id)

    def _leases_ended(self, revoked: list[str]) -> None:
        """On the serving host: leases the cluster no longer renews. A task its origin
        cancelled is cancelled here too, so its request stops; one whose lease ran out goes on
        here (another host may have finished it since, or it failed as lost), and its result
        is fenced out. The renewal that found them revoked forgot their leases already: they
        are kept until their rows are read."""
        self.unread.update(revoked)
        if not self.unread:
            return
        ends = self.cluster.ends_of(self.unread)  # ClusterUnavailable: read at the next look
        revoked, self.unread = sorted(self.unread), set()
        over = {i for i, end in ends.items() if end == "cancelled"}
        for task_id in sorted(over):
            try:
                cancel(self.spool, self.ledger_path, task_id)
                log.info("stopped %s: it was cancelled on its origin", task_id)
            except (NotCancelled, KoubouError) as exc:
                log.info("%s was cancelled on its origin and is not running here: %s",
                         task_id, exc)
        ran_out = sorted(set(revoked) - over)
        if ran_out:
            log.warning("leases revoked (they ran out): %s", ", ".join(ran_out))

    def _served_changed(self) -> bool:
        """Whether the craftsmen live workers here serve changed: pending tasks are judged
        again (a worker stopped, and its tasks must leave; one started, they may stay)."""
        served = served_craftsmen(self.spool)
        changed, self.served = served != self.served, served
        return changed

    def _release_unserved(self) -> None:
        """Give back at once the leases of craftsmen no live worker here serves any more (the
        worker died or stopped), rather than renewing them for tasks nobody here will run. A
        local outcome that comes later is sent back if the task is taken in here again."""
        if not self.up:
            return
        gone = [lease for lease in self.leases.values() if lease.craftsman not in self.served]
        try:
            self.cluster.requeue_many(gone)
        except ClusterUnavailable as exc:
            self._down(exc)
            return
        for lease in gone:
            del self.leases[lease.task_id]
        if gone:
            log.warning("gave back %d lease(s) to the cluster: no live worker here serves %s",
                        len(gone), ", ".join(sorted({lease.craftsman for lease in gone})))

    def _connect(self) -> bool:
        """Make sure of the schema and this bridge's registration; False while unreachable."""
        try:
            self.cluster.ensure_schema()
            self.cluster.register_worker(self.id, os.getpid(), self._serving())
            self._publish_host()
        except ClusterUnavailable as exc:
            self._down(exc)
            return False
        if not self.up:
            log.info("connected to the cluster as host %s", self.settings.host)
        self.up = True
        return True

    def _publish_host(self) -> None:
        """Replace this host's row in cluster_hosts: what every host's `koubou status`,
        `workers`, `report` and dashboard show of this one (observe/cluster_view.py). A
        home this bridge cannot read now (pending/ replaced, a permission taken away) keeps its
        last row, which goes stale; said once a minute while it lasts."""
        try:
            snapshot = self.snapshots.take(time.time())
        except OSError as exc:
            if time.monotonic() - self.unread_logged >= DOWN_LOG_S:
                self.unread_logged = time.monotonic()
                log.warning("this host's row in the cluster is not updated: %s", exc)
            return
        self.board.publish(self.settings.host, snapshot, self.snapshots.unwritten)
        self.snapshots.written()

    def _down(self, exc: ClusterUnavailable) -> None:
        self.up = False
        if time.monotonic() - self.down_logged >= DOWN_LOG_S:
            self.down_logged = time.monotonic()
            log.warning("%s", exc)


class LocalWork:
    """This home's own tasks of the craftsmen served here, counted by the bridge's take-ins
    against max_concurrent: the pending names the bridge judged to stay (`waiting`, name ->
    craftsman), and the workers' claims (entry -> craftsman, or None when taken in)."""

    def __init__(self, spool: Spool, config: Config) -> None:
        self.spool = spool
        self.config = config
        self.waiting: dict[str, str] = {}
        self.running: dict[str, Any] = {}

    def count(self, craftsmen: list[str]) -> dict[str, int]:
        """This home's own tasks of each craftsman (not taken in), running or waiting here, up
        to its max_concurrent: a host busy with its own work takes in only what it has room
        for, and leaves the rest to hosts that are free.

        Running: the workers' claims in in_progress/, each read and routed once. Waiting: the
        pending tasks judged to stay (`waiting`), earliest first; a name no longer in pending/
        (claimed, cancelled, removed) is dropped when met, and counting stops at the bound."""
        busy = dict.fromkeys(craftsmen, 0)
        claims = {entry for entry, match in self.spool.claims()
                  if not match["fin"] and not match["worker"].startswith(BRIDGE_PREFIX)}
        self.running = {entry: self.running.get(entry, _UNREAD) for entry in claims}
        for entry, craftsman in self.running.items():
            if craftsman is _UNREAD:
                craftsman = self.running[entry] = self._craftsman_of_claim(entry)
            if craftsman in busy:
                busy[craftsman] += 1
        bound = {c: self.config.craftsmen[c].max_concurrent for c in craftsmen}
        short = {c for c in craftsmen if busy[c] < bound[c]}
        gone = []
        for name, craftsman in self.waiting.items():
            if not short:
                break
            if craftsman not in short:
                continue
            if not os.path.lexists(self.spool.pending / name):
                gone.append(name)
                continue
            busy[craftsman] += 1
            if busy[craftsman] >= bound[craftsman]:
                short.discard(craftsman)
        for name in gone:
            del self.waiting[name]
        return busy

    def _craftsman_of_claim(self, entry: str) -> str | None:
        """The craftsman a worker's claim of this home's own task is for; None for a task
        taken in (its lease counts it), one gone or unreadable."""
        try:
            data, _ = self.spool.read_entry(self.spool.in_progress, entry)
            task = task_format.parse(data, default_id=task_format.id_from_name(
                CLAIM_RE.fullmatch(entry)["name"]))
            if bridge.taken_in(task):
                return None
            return router.route(task, self.config).craftsman
        except (OSError, Refused, Unavailable, InvalidTask, KoubouError):
            return None


def run_bridge(home: Path, config: Config) -> int:
    """Build and run the bridge of a home."""
    return Bridge(home, config).run()
