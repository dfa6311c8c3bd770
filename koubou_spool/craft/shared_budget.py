"""The cluster's half of the budget and rate windows (PRODUCT.md §12, docs/CLUSTER.md).

With `cluster.dsn_env` set, every priced call of every host reserves its worst case on the
cluster's one budget row in PostgreSQL (one conditional UPDATE), and settles its real cost
there afterwards; the home's SQLite ledger keeps its own records beside it (reports). Their
`max_rpm` and `max_tpm` windows are counted there too, one conditional UPDATE each. One
connection per worker process, opened at the first priced call: a worker of local craftsmen
never connects.

While PostgreSQL cannot be reached no reservation can be made, so no cloud call is made:
limits.Budget marks the home exhausted and `when_exhausted` decides. A thread then reconnects
with a growing pause (0.1 s doubling to 5 s, as the cluster's listener does); once connected it
settles what waited, and `on_reachable` wakes the worker to judge deferred tasks again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from ..config import ClusterSettings, Config
from .budget import reached
from ..spool.cluster import BACKOFF_S, Cluster, ClusterSchemaError, ClusterUnavailable

log = logging.getLogger(__name__)

# Open longer than any attempt lasts: its host died and never came back to settle it.
RESERVATION_EXPIRY_S = 24 * 3600.0


class SharedBudget:
    """One worker process's handle on the cluster's budget; called from worker threads."""

    def __init__(self, dsn: str | None, host: str, dsn_env: str = "") -> None:
        self.host = host
        self.dsn_env = dsn_env
        self._cluster = Cluster(dsn, host=host) if dsn else None
        self._lock = threading.Lock()  # one connection: one statement at a time
        self._ids: dict[int, int] = {}  # the ledger's reservation id -> the cluster's
        self._unsettled: list[tuple[int, float | None]] = []  # settles waiting for the database
        self._reconnecting = False
        self._migrated = False
        self.on_reachable: Callable[[], None] | None = None  # set by the worker

    @classmethod
    def from_config(cls, config: Config) -> SharedBudget | None:
        """The handle for a home in a cluster (None without `cluster.dsn_env`). The DSN is
        read from the environment once, here, and never logged."""
        settings = ClusterSettings.parse(config.cluster)
        if not settings.enabled:
            return None
        return cls(os.environ.get(settings.dsn_env or ""), settings.host, settings.dsn_env or "")

    def reserve(self, ledger_id: int, *, task_id: str, attempt: int, craftsman: str,
                amount: float, day: str, month: str, daily_limit: float | None,
                monthly_limit: float | None) -> bool:
        """Reserve on the cluster's row, tied to the ledger's reservation; False when it does
        not fit what the cluster has left. ClusterUnavailable when it cannot be asked."""
        verdict, cluster_id = self._call(
            lambda cluster: cluster.reserve(
                task_id=task_id, attempt=attempt, craftsman=craftsman, amount=amount, day=day,
                month=month, daily_limit=daily_limit, monthly_limit=monthly_limit))
        if verdict != "ok":
            return False
        with self._lock:
            self._ids[ledger_id] = int(cluster_id)
        return True

    def count_request(self, craftsman: str, max_rpm: int | None, max_tpm: int | None,
                      tokens: int) -> float:
        """A place in the craftsman's cluster-wide rate window: 0.0, or seconds to wait."""
        return self._call(lambda cluster: cluster.count_request(craftsman, max_rpm, max_tpm,
                                                                tokens))

    def settle(self, ledger_id: int, cost: float | None) -> bool:
        """Settle the cluster's side of a ledger reservation; True when it was settled in
        the cluster now (False: it has none, or it waits). Never raises: while the database
        is away the settle waits for the reconnect, and the whole reservation counts
        meanwhile, on the budget's side."""
        with self._lock:
            cluster_id = self._ids.pop(ledger_id, None)
        if cluster_id is None:
            return False
        try:
            self._call(lambda cluster: cluster.settle(cluster_id, cost))
            return True
        except ClusterUnavailable:
            with self._lock:
                self._unsettled.append((cluster_id, cost))
            return False

    def settle_lost(self, task_id: str) -> None:
        """A dead worker's reservations of a task on this host count in full."""
        try:
            self._call(lambda cluster: cluster.settle_lost(task_id))
        except ClusterUnavailable as exc:  # they count in full already; only the mark waits
            log.info("open cluster reservations of %s stay open for now: %s", task_id, exc)

    def alerts_due(self, day: str, month: str, limits: tuple[float | None, float | None],
                   thresholds: tuple[int, ...]) -> list[tuple[str, int, float, float]] | None:
        """The alerts (period, percent, spent, limit) this host is the first in the cluster to
        raise, from the cluster's real spend against the (daily, monthly) limits, each under
        the period that spend is of (a newer one than `day` when this host's clock lags);
        None while the cluster cannot be reached (a later settle catches up: a threshold
        passed stays passed)."""
        try:
            spent = self._call(lambda cluster: cluster.settled(day, month))
            due = []
            for (period, so_far), limit in zip(spent, limits, strict=True):
                for percent in reached(thresholds, so_far, limit):
                    if self._call(lambda cluster, p=period, n=percent, s=so_far, cap=limit:
                                  cluster.record_alert(p, n, s, cap)):
                        due.append((period, percent, so_far, limit))
            return due
        except ClusterUnavailable:
            return None

    def spent(self, day: str, month: str) -> tuple[float, float] | None:
        """The cluster's day and month figures, or None while it cannot be reached (then a
        reconnect is under way, and `on_reachable` says when it is back)."""
        try:
            return self._call(lambda cluster: cluster.spent(day, month))
        except ClusterUnavailable:
            return None

    def _call(self, operation: Callable[[Cluster], object]) -> object:
        """operation(cluster) under the lock; a lost connection starts the reconnect."""
        if self._cluster is None:
            raise ClusterUnavailable(f"cluster.dsn_env names {self.dsn_env}, which is not set "
                                     "in this worker's environment, so the cluster's budget "
                                     "cannot be reached")
        if self._reconnecting:  # the reconnect thread says when it is back: no try per call
            raise ClusterUnavailable("the cluster's PostgreSQL cannot be reached; reconnecting")
        try:
            with self._lock:
                if not self._migrated:  # the first connection makes sure of the schema
                    self._cluster.ensure_schema()
                    self._migrated = True
                return operation(self._cluster)
        except ClusterUnavailable:
            self._start_reconnecting()
            raise
        except ClusterSchemaError as exc:  # a newer koubou made it: no call it cannot vouch for
            log.error("%s", exc)
            raise ClusterUnavailable(str(exc)) from None

    def _start_reconnecting(self) -> None:
        with self._lock:
            if self._reconnecting:
                return
            self._reconnecting = True
        log.warning("the cluster's budget cannot be reached; no cloud call until it is back")
        threading.Thread(target=self._reconnect, name="cluster-budget", daemon=True).start()

    def _reconnect(self) -> None:
        """Connect again with a growing pause (only while the database is away), settle what
        waited, expire what was left open for good, then wake the worker."""
        pause = BACKOFF_S[0]
        while True:
            time.sleep(pause)
            try:
                with self._lock:
                    self._cluster.ensure_schema()
                    self._migrated = True
                    while self._unsettled:
                        cluster_id, cost = self._unsettled[0]
                        self._cluster.settle(cluster_id, cost)
                        self._unsettled.pop(0)
                    self._cluster.expire_reservations(RESERVATION_EXPIRY_S)
                    self._reconnecting = False
                break
            except ClusterUnavailable as exc:
                log.debug("cluster budget still unreachable: %s", exc)
                pause = min(pause * 2, BACKOFF_S[1])
        log.info("the cluster's budget is reachable again")
        if self.on_reachable is not None:
            self.on_reachable()

    def close(self) -> None:
        """Close the connection."""
        if self._cluster is not None:
            with self._lock:
                self._cluster.close_quietly()
