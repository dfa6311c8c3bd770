"""Slots the hosts of a cluster share: `max_concurrent` across hosts (PRODUCT.md §12).

- **Which slots.** Those of a server every host reaches at one address: the base_url of a
  craftsman (or of one of its endpoints) whose host is not loopback, for a craftsman that is
  not `local: true`. A loopback URL names each host's own server; its slots stay the home's
  lock files (craft.limits.Slots), which are taken first in any case.
- **How.** Slot n of key k is the session advisory lock (hashtext(k), n), held on this worker's
  own connection while the request runs and given back with pg_advisory_unlock. A session lock
  dies with its session as an flock dies with its process: a worker killed with SIGKILL frees
  its slots when the server sees its socket close, a host cut off when the server's
  keepalives for that session end (set to about 11 s on connecting, as the host's own are).
  No lease to renew, no expiry to choose, no sweep.
- **The loop never waits on the database.** One thread takes and gives back the locks.
  `take(key)` hands over a lock the thread already holds for this worker, or asks for one and
  returns None: the task waits in pending/, and `on_grant` wakes the worker when the lock is
  held. The thread wakes on its queue, on NOTIFY koubou_slots (sent with each unlock), and,
  only while a key is wanted, every RETRY_S: a session that died frees its locks without a
  NOTIFY. Nothing runs in the steady state. A request failing over to another shared endpoint
  waits for its grant instead (`wait_for`): the grant goes to that request, in use at once.
- **PostgreSQL away.** No slot is granted; tasks wait in pending/ and the thread reconnects
  (0.1 s doubling to 5 s), saying so once an outage. After a restart every lock is gone while
  requests still run: the thread takes the slots in use again by number before granting any
  new one, and a slot another host took meanwhile is one request over the cap, for the length
  of that request.
  Loopback endpoints are untouched by any of this.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import select
import threading
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

import psycopg

from ..config import ClusterSettings, Config, Craftsman
from ..spool.cluster import BACKOFF_S, ClusterUnavailable, close_quietly, connect
from .endpoints import endpoint_key, url_key

log = logging.getLogger(__name__)

SLOTS_CHANNEL = "koubou_slots"  # payload: the key of a slot given back
RETRY_S = 2.0  # while a key is wanted: a dead session's locks are free without a NOTIFY
TRY = "SELECT pg_try_advisory_lock(hashtext(%s), %s)"
GIVE = "SELECT pg_advisory_unlock(hashtext(%s), %s), pg_notify(%s, %s)"
# The locks live as long as the server keeps the session: for a host cut off by the network it
# must notice as the host does (spool.cluster.KEEPALIVES), not after the system's 2 hours.
SERVER_KEEPALIVES = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2,
                     "tcp_keepalives_count": 3, "tcp_user_timeout": 11_000}


def shared_url(base_url: str) -> bool:
    """Whether a base_url names one server for every host: not a loopback address (an empty
    base_url is the provider's cloud API)."""
    if not base_url:
        return True
    host = urlsplit(base_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: resolved elsewhere, so treated as one server for all


def cluster_caps(craftsmen: Iterable[Craftsman]) -> dict[str, int]:
    """The slots the cluster shares, by key: each shared server's max_concurrent."""
    caps = {}
    for craftsman in craftsmen:
        if craftsman.backend != "openai" or craftsman.local:
            continue
        for endpoint in craftsman.endpoints:
            if shared_url(endpoint.base_url):
                caps[endpoint_key(craftsman.name, endpoint)] = endpoint.max_concurrent
        if not craftsman.endpoints and shared_url(craftsman.base_url):
            caps[url_key(craftsman.name, craftsman.base_url)] = craftsman.max_concurrent
    return caps


class SharedSlots:
    """This worker's cluster-wide slots, `caps[key]` of them per key; one connection, one thread.

    `take`, `give` and `drop_spares` are called from the worker's loop and never block on the
    database; `on_grant` is called from the thread (the worker makes it thread-safe)."""

    def __init__(self, dsn: str | None, caps: dict[str, int], dsn_env: str = "") -> None:
        self.dsn = dsn
        self.dsn_env = dsn_env
        self.caps = dict(caps)
        self.on_grant: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._spare: dict[str, list[int]] = {k: [] for k in caps}  # held, not handed out
        self._in_use: dict[str, set[int]] = {k: set() for k in caps}  # handed out to requests
        self._held: dict[str, set[int]] = {k: set() for k in caps}  # what the session holds
        self._wanted: set[str] = set()
        # Requests waiting for a slot of the key (a failover): a grant goes to the first, in use
        # at once, never a spare the loop could give back before the request takes it.
        self._waiters: dict[str, list[concurrent.futures.Future]] = {k: [] for k in caps}
        self._gives: list[tuple[str, int]] = []
        self._closed = False
        self._said_down = False  # this outage was logged as a warning already
        self._conn: psycopg.Connection | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="cluster-slots", daemon=True)
        self._thread.start()

    # --- from the worker's loop ----------------------------------------------------------------

    def take(self, key: str) -> int | None:
        """A slot of the key this worker holds in the cluster, or None: one is asked for, and
        `on_grant` says when it is held."""
        with self._lock:
            if self._spare[key]:
                slot = self._spare[key].pop()
                self._in_use[key].add(slot)
                return slot
            self._wanted.add(key)
        self._nudge()
        return None

    def has_spare(self, key: str) -> bool:
        """Whether `take(key)` would hand a slot over now; if not, one is asked for."""
        with self._lock:
            if self._spare[key]:
                return True
            self._wanted.add(key)
        self._nudge()
        return False

    def wait_for(self, key: str) -> concurrent.futures.Future:
        """A slot of the key for a request that waits for it: a spare at once, else the next
        grant. A waiter that gives up calls `stop_waiting`, which gives back a slot granted to
        it meanwhile."""
        waiter: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._spare[key]:
                slot = self._spare[key].pop()
                self._in_use[key].add(slot)
                waiter.set_result(slot)
                return waiter
            self._waiters[key].append(waiter)
            self._wanted.add(key)
        self._nudge()
        return waiter

    def stop_waiting(self, key: str, waiter: concurrent.futures.Future) -> None:
        """A waiter of `wait_for` gave up (its time ran out, its task was cancelled)."""
        with self._lock:
            if waiter in self._waiters[key]:
                self._waiters[key].remove(waiter)
            if not self._waiters[key]:  # a grant now would go unused (the loop asks again
                self._wanted.discard(key)  # at its next pump, as the attempt's end brings)
            waiter.cancel()
            granted = waiter.done() and not waiter.cancelled()
        if granted:
            self.give(key, waiter.result())

    def give(self, key: str, slot: int) -> None:
        """A request ended: its slot goes back to the cluster."""
        with self._lock:
            self._in_use[key].discard(slot)
            self._gives.append((key, slot))
        self._nudge()

    def drop_spares(self, key: str) -> None:
        """No task waits for the key any more: what is held unused goes back."""
        with self._lock:
            if not self._waiters[key]:
                self._wanted.discard(key)
            spares, self._spare[key] = self._spare[key], []
            self._gives.extend((key, slot) for slot in spares)
        if spares:
            self._nudge()

    def held(self, key: str) -> tuple[int, int]:
        """The key's slots this worker holds: (in use by requests, spare)."""
        with self._lock:
            return len(self._in_use[key]), len(self._spare[key])

    @classmethod
    def for_worker(cls, config: Config, craftsmen: Iterable[Craftsman]) -> SharedSlots | None:
        """The cluster slots of the craftsmen a worker serves; None outside a cluster or when
        none of them is on a server the cluster shares (then no connection is made)."""
        settings = ClusterSettings.parse(config.cluster)
        caps = cluster_caps(craftsmen) if settings.enabled else {}
        if not caps:
            return None
        return cls(os.environ.get(settings.dsn_env or ""), caps, settings.dsn_env or "")

    def close(self) -> None:
        """Stop the thread; the session's end frees every lock it held."""
        self._closed = True
        self._nudge()
        self._thread.join(timeout=10)  # a connect under way ends within its 5 s timeout
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _nudge(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: the thread has wake-ups enough
        except OSError:
            pass  # closed: the worker is stopping

    # --- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        if not self.dsn:
            log.error("cluster.dsn_env names %s, which is not set in this worker's environment:"
                      " tasks of craftsmen on servers the cluster shares wait", self.dsn_env)
            return
        pause = BACKOFF_S[0]
        while not self._closed:
            if self._conn is None and not self._connect():
                self._wait(pause)
                pause = min(pause * 2, BACKOFF_S[1])
                continue
            pause = BACKOFF_S[0]
            try:
                self._serve()
                if self._notified():  # a slot was given back while we served: try again
                    continue
                self._wait(RETRY_S if self._wanted else None, self._conn)
                self._notified()
            except psycopg.Error as exc:  # lost, or refused: start again on a new session
                self._lost(exc)
        close_quietly(self._conn)

    def _notified(self) -> bool:
        """Whether NOTIFYs came (kept by psycopg while statements ran, or on the socket now)."""
        return bool(list(self._conn.notifies(timeout=0)))

    def _wait(self, timeout: float | None, conn: psycopg.Connection | None = None) -> None:
        """Until the loop nudges, a NOTIFY arrives on the connection, or the timeout."""
        watched = [self._wake_r] + ([conn.fileno()] if conn is not None else [])
        readable, _, _ = select.select(watched, [], [], timeout)
        if self._wake_r in readable:
            os.read(self._wake_r, 4096)

    def _connect(self) -> bool:
        """Connect, LISTEN, and take back by number the slots requests still use. A failure on
        the way closes the connection, its session's locks with it: nothing of it is kept."""
        conn = None
        try:
            conn = connect(self.dsn)
            for name, value in SERVER_KEEPALIVES.items():
                conn.execute("SELECT set_config(%s, %s, false)", (name, str(value)))
            conn.execute(f"LISTEN {SLOTS_CHANNEL}")
            held, lost = self._retake(conn)
        except (ClusterUnavailable, psycopg.Error) as exc:
            close_quietly(conn)
            self._unreachable(exc)
            return False
        for key, slot in lost:
            log.warning("cluster slot %d of %s was taken while PostgreSQL was away: one request "
                        "over its max_concurrent until it ends", slot, key)
        self._conn, self._held, self._said_down = conn, held, False
        log.info("cluster slots: connected")
        return True

    def _retake(self, conn: psycopg.Connection) -> tuple[dict[str, set[int]],
                                                         list[tuple[str, int]]]:
        """Take again on a new session the slots requests still use: those it holds now, by
        key, and those another session took meanwhile."""
        with self._lock:
            in_use = {key: sorted(slots) for key, slots in self._in_use.items()}
        held: dict[str, set[int]] = {key: set() for key in self.caps}
        lost = []
        for key, slots in in_use.items():
            for slot in slots:
                if conn.execute(TRY, (key, slot)).fetchone()[0]:
                    held[key].add(slot)
                else:
                    lost.append((key, slot))
        return held, lost

    def _unreachable(self, exc: Exception) -> None:
        """A connect that failed: said once an outage, and at each try only for debugging."""
        if self._said_down:
            log.debug("cluster slots: %s", exc)
            return
        self._said_down = True
        said = (str(exc) if isinstance(exc, ClusterUnavailable)
                else f"the cluster's PostgreSQL failed the slots' session ({_reason(exc)})")
        log.warning("cluster slots: %s (tasks of shared endpoints wait; retrying)", said)

    def _lost(self, exc: Exception) -> None:
        """The connection is gone, and every lock of its session with it."""
        log.warning("cluster slots lost PostgreSQL (%s); tasks of shared endpoints wait",
                    _reason(exc))
        self._said_down = True  # the outage is said: its reconnects' failures need not be
        close_quietly(self._conn)
        self._conn = None
        with self._lock:
            for key in self.caps:
                self._held[key].clear()
                if self._spare[key]:
                    self._spare[key].clear()
                    self._wanted.add(key)
            self._gives.clear()  # their locks ended with the session

    def _serve(self) -> None:
        """Give back what ended, then try for one slot of each key wanted."""
        with self._lock:
            gives, self._gives = self._gives, []
        for key, slot in gives:
            if slot in self._held[key]:
                self._conn.execute(GIVE, (key, slot, SLOTS_CHANNEL, key))
                self._held[key].discard(slot)
        granted = False
        with self._lock:
            wanted = sorted(self._wanted)
        for key in wanted:
            slot = self._try(key)
            if slot is None:
                continue
            with self._lock:
                if self._hand_to_waiter(key, slot):
                    continue
                if key in self._wanted:
                    self._wanted.discard(key)
                    self._spare[key].append(slot)
                    granted = True
                    continue
            self._conn.execute(GIVE, (key, slot, SLOTS_CHANNEL, key))  # no longer wanted
            self._held[key].discard(slot)
        if granted:
            self.on_grant()

    def _hand_to_waiter(self, key: str, slot: int) -> bool:
        """Give a slot just granted to the first request waiting for the key (under the
        lock); whether one took it. The key stays wanted: the loop may want it too (a grant
        nobody takes goes back at its next pump)."""
        while self._waiters[key]:
            waiter = self._waiters[key].pop(0)
            if waiter.set_running_or_notify_cancel():
                self._in_use[key].add(slot)
                waiter.set_result(slot)
                return True
        return False

    def _try(self, key: str) -> int | None:
        """Take the first slot of the key that nobody holds; None when all are held."""
        with self._lock:  # a request's slot whose retake failed after a reconnect is its still
            in_use = set(self._in_use[key])
        for slot in range(self.caps[key]):
            # A session's advisory locks stack: never try one this session holds already, nor
            # hand out a number a request of this worker still runs under.
            if slot in self._held[key] or slot in in_use:
                continue
            if self._conn.execute(TRY, (key, slot)).fetchone()[0]:
                self._held[key].add(slot)
                return slot
        return None


def _reason(exc: Exception) -> str:
    """The first line of an error, or its type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
