"""Several endpoints of one craftsman (PRODUCT.md §12): which one takes a request, and which rest.

- Slots: `max_concurrent` per endpoint as lock files run/slots/<craftsman>@<key>/<n>, flocked
  like craft.limits.Slots (the kernel drops a dead process's locks). A craftsman with endpoints
  has no slots of its own: its capacity is their sum, and the slot dispatch takes before a
  claim is a Lease on one endpoint, which the request may move to another. In a cluster an
  endpoint every host reaches also needs one of its cluster slots (craft.shared_slots): it is
  a candidate only while this worker holds one ready, and the Lease carries it.
- Choice: the usable endpoint with the most free slots (times its weight), ties to the lowest
  recent latency. Free slots are counted home-wide, so busy workers elsewhere count too (a
  least-busy choice made from one process's view is what sent LiteLLM's traffic to one host).
- Cooldown: run/endpoints/<craftsman>@<key>.json, the home's: a host one worker found dead is
  skipped by every worker at its next choice, read from the file, never from a cache that lags
  (a stat per choice; the file is read again only when it changed), and written whole
  (spool.durable). It grows from COOL_FIRST_S,
  doubling with each failure in a row, to COOL_MAX_S, and lasts at least the Retry-After.
- Probe: when a cooldown ends, GET /models (PROBE_S) must answer before traffic returns; a
  failed probe is one more failure in a row.
- Every endpoint resting: acquire() gives None, and one timer wakes the worker when the first
  cooldown ends; the tasks wait in pending/ without spending attempts. No polling.

The key of an endpoint is a hash of its base_url, so reordering the config keeps its slots
and its cooldown.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..config import Craftsman, Endpoint
from ..spool import durable, permissions
from .limits import MarkFile, Slots

log = logging.getLogger(__name__)

COOL_FIRST_S = 2.0
COOL_MAX_S = 300.0
PROBE_S = 3.0
LATENCY_WEIGHT = 0.3  # of the newest request in the moving average
LATENCY_TIE = 1.25  # latencies within this factor of the lowest count as equal


def cooldown_s(failures: int, retry_after: float | None = None) -> float:
    """How long an endpoint rests after `failures` in a row (at least what the server asked)."""
    grown = min(COOL_MAX_S, COOL_FIRST_S * 2 ** max(0, failures - 1))
    return max(grown, min(retry_after or 0.0, COOL_MAX_S))


def endpoint_key(craftsman: str, endpoint: Endpoint) -> str:
    """The endpoint's name in run/: its craftsman and a hash of its base_url."""
    return url_key(craftsman, endpoint.base_url)


def url_key(craftsman: str, base_url: str) -> str:
    """A craftsman's server by name: the craftsman and a hash of the base_url (the same on
    every host, so a cluster's hosts name a shared server's slots alike)."""
    digest = hashlib.sha256(base_url.encode()).hexdigest()[:12]
    return f"{craftsman}@{digest}"


def choose(free: list[int], weights: list[float], latency: list[float | None],
           candidates: list[int], turn: int = 0) -> int | None:
    """The candidate with the most free slots times its weight, ties to the lowest latency (an
    endpoint not yet measured counts as fastest, so it gets measured); None when none has a
    free slot. Latencies within LATENCY_TIE of the lowest are a tie too, taken in turn from
    index `turn` on: equal endpoints measured a little apart by noise still share equally."""
    open_ = [i for i in candidates if free[i] > 0]
    if not open_:
        return None
    most = max(free[i] * weights[i] for i in open_)
    best = [i for i in open_ if free[i] * weights[i] == most]
    fastest = min(latency[i] or 0.0 for i in best)
    near = [i for i in best if (latency[i] or 0.0) <= fastest * LATENCY_TIE]
    return min(near, key=lambda i: (i - turn) % len(free))


class Rest(MarkFile):
    """One endpoint's cooldown file: {until, failures, probed, reason}; absent when well.

    A record the disk refused is kept in memory, so this process at least honours its own
    rest (without it, a dead host would be picked again at once, and tasks claimed and given
    back in a loop)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._unwritten: dict | None = None

    def read(self) -> dict | None:
        """The record on disk, else the one the disk refused, else None (well)."""
        found = super().read()
        return found if found is not None else self._unwritten

    def parse(self, obj: dict) -> dict:
        """The record with its types checked."""
        return {"until": float(obj["until"]), "failures": int(obj["failures"]),
                "probed": bool(obj.get("probed")), "reason": str(obj.get("reason", ""))}

    def write(self, record: dict) -> None:
        """Replace the record whole; a failure to write only costs a repeated try."""
        try:
            durable.write_atomic(self.path, json.dumps(record).encode())
            self._unwritten = None
        except OSError as exc:
            self._unwritten = record
            log.warning("cannot write %s: %s", self.path, exc.strerror)

    def clear(self) -> None:
        """The endpoint is well again."""
        self._unwritten = None
        super().clear()


@dataclass
class Lease:
    """One endpoint slot held for one request: which endpoint (`index`) and which slot, and
    for an endpoint the cluster shares, which of its cluster slots (craft.shared_slots)."""

    index: int
    slot: int  # -1: given back (a failover waiting for another endpoint's grant)
    shared: int | None = None


class ClusterSlots(Protocol):
    """What slots take of craft.shared_slots.SharedSlots (imported only in a cluster)."""

    caps: dict[str, int]

    def take(self, key: str) -> int | None: ...
    def has_spare(self, key: str) -> bool: ...
    def give(self, key: str, slot: int) -> None: ...
    def drop_spares(self, key: str) -> None: ...
    def held(self, key: str) -> tuple[int, int]: ...
    def wait_for(self, key: str) -> concurrent.futures.Future: ...
    def stop_waiting(self, key: str, waiter: concurrent.futures.Future) -> None: ...


@dataclass
class Figures:
    """What this process counted at one endpoint (for heartbeats, metrics, `koubou workers`)."""

    requests: int = 0
    failures: int = 0
    in_flight: int = 0
    latency_s: float | None = None  # moving average of answered requests


class EndpointPool:
    """The endpoints of one craftsman in this process: their slots, rests, probes, figures.

    `probe(index)` is set by the backend (it has the clients); `wake` is the worker's, called
    when an endpoint may take traffic again."""

    def __init__(self, craftsman: Craftsman, run: Path, wake: Callable[[], None] = lambda: None,
                 cluster: ClusterSlots | None = None) -> None:
        self.craftsman = craftsman
        self.endpoints = list(craftsman.endpoints)
        self.keys = [endpoint_key(craftsman.name, e) for e in self.endpoints]
        self.cluster = cluster  # the cluster's slots of the endpoints it shares (cluster.caps)
        self.slots = Slots(run / "slots", {k: e.max_concurrent
                                           for k, e in zip(self.keys, self.endpoints, strict=True)})
        rests = run / "endpoints"
        permissions.make_dir(rests, permissions.OWNER_DIR, parents=True)
        self.rests = [Rest(rests / f"{key}.json") for key in self.keys]
        self.figures = [Figures() for _ in self.endpoints]
        self.wake = wake
        self.probe: Callable[[int], Awaitable[bool]] | None = None
        self._probing: dict[int, asyncio.Task] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._turn = 0  # where the next tie starts, so equal endpoints take turns

    # --- choosing -----------------------------------------------------------------------------

    def acquire(self, exclude: set[int] = frozenset()) -> Lease | None:
        """A slot at the best usable endpoint not in `exclude`; None when none has one (then a
        timer wakes the worker when the first rest ends, or a freed slot's outcome does)."""
        considered = [i for i in range(len(self.endpoints)) if i not in exclude]
        usable = [i for i in considered if self.usable(i)]
        self._drop_spares_of(i for i in considered if i not in usable)  # resting
        candidates = [i for i in usable if self._cluster_has_room(i)]
        free = [0] * len(self.endpoints)
        taken: dict[int, int] = {}
        for index in candidates:
            free[index], taken[index] = self._count_free(index)
        best = choose(free, [e.weight for e in self.endpoints],
                      [f.latency_s for f in self.figures], candidates, self._turn)
        if best is not None:
            self._turn = best + 1
        for index, slot in taken.items():
            if index != best and slot >= 0:
                self.slots.release(self.keys[index], slot)
        if best is None:
            return None
        shared = self._take_cluster_slot(best)
        if shared is None and self._shared(best):  # the spare went with a lost connection
            self.slots.release(self.keys[best], taken[best])
            return None
        return Lease(best, taken[best], shared)

    def _shared(self, index: int) -> bool:
        return self.cluster is not None and self.keys[index] in self.cluster.caps

    def _cluster_has_room(self, index: int) -> bool:
        """For an endpoint the cluster shares: whether this worker holds one of its cluster
        slots ready (if not, one is asked for, and its grant wakes the worker)."""
        return not self._shared(index) or self.cluster.has_spare(self.keys[index])

    def _take_cluster_slot(self, index: int) -> int | None:
        return self.cluster.take(self.keys[index]) if self._shared(index) else None

    def drop_spares(self) -> None:
        """No task of the craftsman waits: cluster slots held unused go back."""
        self._drop_spares_of(range(len(self.endpoints)))

    def _drop_spares_of(self, indexes: Iterable[int]) -> None:
        """Cluster slots held unused for these endpoints go back (a resting one's too: other
        hosts may reach it)."""
        for index in indexes:
            if self._shared(index):
                self.cluster.drop_spares(self.keys[index])

    def _count_free(self, index: int) -> tuple[int, int]:
        """Free slots of the endpoint, home-wide, and one of them taken (-1 if none)."""
        key = self.keys[index]
        first = self.slots.acquire(key)
        if first is None:
            return 0, -1
        free, probes = 1, []
        while (slot := self.slots.acquire(key)) is not None:
            probes.append(slot)
            free += 1
        for slot in probes:
            self.slots.release(key, slot)
        return free, first

    def move(self, lease: Lease, tried: set[int]) -> bool:
        """Move the lease to the best usable endpoint not yet tried; False when none has room."""
        better = self.acquire(tried | {lease.index})
        if better is None:
            return False
        self.release(lease)
        lease.index, lease.slot, lease.shared = better.index, better.slot, better.shared
        return True

    async def move_waiting(self, lease: Lease, tried: set[int], within_s: float) -> bool:
        """Move the lease as `move` does; when only endpoints the cluster shares have room here
        but this worker holds none of their cluster slots (a worker at its --concurrency gives
        its spares back), wait up to `within_s` for a grant of the best of them. The slots of
        the endpoint left go back before the wait: another request, here or on another host,
        may be waiting for them. False when none is left, or the wait ran out."""
        if self.move(lease, tried):
            return True
        if within_s <= 0:
            return False  # no time to wait: the lease stays as it was, for the caller to end
        exclude = tried | {lease.index}
        deadline = time.monotonic() + within_s
        while (index := self._waitable(exclude)) is not None:
            self.release(lease)  # holds nothing now; released again, it gives back nothing
            key = self.keys[index]
            waiter = self.cluster.wait_for(key)
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    shared = await asyncio.wrap_future(waiter)
            except TimeoutError:
                self.cluster.stop_waiting(key, waiter)
                return False
            except asyncio.CancelledError:  # the claim revoked, the worker stopping
                self.cluster.stop_waiting(key, waiter)
                raise
            slot = self.slots.acquire(key) if self.usable(index) else None
            if slot is None:  # taken here meanwhile, or resting now: look again
                self.cluster.give(key, shared)
                continue
            lease.index, lease.slot, lease.shared = index, slot, shared
            return True
        return False

    def _waitable(self, exclude: set[int]) -> int | None:
        """The usable endpoint the cluster shares, not in `exclude`, with the most slots free
        here; None when there is none."""
        free = {i: self._count_free(i) for i in range(len(self.endpoints))
                if i not in exclude and self._shared(i) and self.usable(i)}
        for index, (_, slot) in free.items():
            if slot >= 0:
                self.slots.release(self.keys[index], slot)
        room = [i for i, (count, _) in free.items() if count > 0]
        return max(room, key=lambda i: (free[i][0], self.endpoints[i].weight), default=None)

    def release(self, lease: Lease) -> None:
        """Give the lease's slot back (and its cluster slot); the lease holds none after."""
        if lease.slot >= 0:
            self.slots.release(self.keys[lease.index], lease.slot)
        if lease.shared is not None:
            self.cluster.give(self.keys[lease.index], lease.shared)
        lease.slot, lease.shared = -1, None

    def usable(self, index: int) -> bool:
        """Whether the endpoint takes traffic: well, or probed since its rest. A rest that has
        ended starts a probe and wakes the worker when it answers; one still running sets the
        timer for its end."""
        record = self.rests[index].read()
        if record is None or record["probed"]:
            return True
        if record["until"] <= time.time():
            self._start_probe(index)
        else:
            self._wake_at(record["until"])
        return False

    # --- what happened --------------------------------------------------------------------------

    def sent(self, index: int) -> None:
        """A request left for the endpoint."""
        figures = self.figures[index]
        figures.requests += 1
        figures.in_flight += 1

    def answered(self, index: int, seconds: float) -> None:
        """The endpoint answered: its latency is remembered, and a trial after a probe is over.
        An answer to a request sent before a rest began does not end the rest: a 429 must keep
        every request away for its Retry-After, whatever was already in flight."""
        figures = self.figures[index]
        figures.in_flight -= 1
        figures.latency_s = seconds if figures.latency_s is None else (
            LATENCY_WEIGHT * seconds + (1 - LATENCY_WEIGHT) * figures.latency_s)
        record = self.rests[index].read()
        if record is not None and record["probed"]:
            self.rests[index].clear()

    def aborted(self, index: int) -> None:
        """A request was cancelled (its claim revoked, the worker stopping): no verdict."""
        self.figures[index].in_flight -= 1

    def failed(self, index: int, reason: str, retry_after: float | None = None) -> float:
        """The endpoint failed (connection, timeout, 5xx, 429): it rests, for every worker of
        the home; returns for how long."""
        figures = self.figures[index]
        figures.in_flight -= 1
        figures.failures += 1
        return self._rest(index, reason, retry_after)

    def _rest(self, index: int, reason: str, retry_after: float | None = None) -> float:
        """Start a rest, one failure longer than the last; during a rest, the failures of
        requests already in flight are the same failure (a dead host fails them all at once)
        and only a longer Retry-After lengthens it."""
        record = self.rests[index].read()
        now = time.time()
        if record is not None and not record["probed"] and record["until"] > now:  # resting
            if not retry_after or now + retry_after <= record["until"]:
                return record["until"] - now
            failures, seconds = record["failures"], min(retry_after, COOL_MAX_S)
        else:
            failures = (record["failures"] if record else 0) + 1
            seconds = cooldown_s(failures, retry_after)
        until = now + seconds
        self.rests[index].write({"until": until, "failures": failures, "probed": False,
                                 "reason": reason[:300]})
        log.warning("endpoint %s of %s rests %.1f s: %s", self.endpoints[index].base_url,
                    self.craftsman.name, seconds, reason)
        return seconds

    # --- probes and the timer ----------------------------------------------------------------------

    def _start_probe(self, index: int) -> None:
        if self.probe is None or index in self._probing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._probing[index] = loop.create_task(self._probe(index))

    async def _probe(self, index: int) -> None:
        try:
            well = await self.probe(index)
        except Exception as exc:  # a bug in a probe must not leave the endpoint resting forever
            log.exception("probe of %s failed", self.endpoints[index].base_url)
            well = False
            reason = f"probe failed: {exc}"
        else:
            reason = "probe: GET /models did not answer"
        finally:
            self._probing.pop(index, None)
        if well:
            record = self.rests[index].read()
            if record is not None:
                self.rests[index].write({**record, "probed": True})
            log.info("endpoint %s of %s answered its probe; traffic returns",
                     self.endpoints[index].base_url, self.craftsman.name)
            self.wake()
        else:
            self._wake_at(time.time() + self._rest(index, reason))

    def _wake_at(self, when: float) -> None:
        """One timer, at the earliest rest's end."""
        if self._timer is not None and self._timer_at <= when and self._timer_at > time.time():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_later(max(0.0, when - time.time()) + 0.01, self._timer_due)

    def _timer_due(self) -> None:
        self._timer = None
        self.wake()

    # --- reading ---------------------------------------------------------------------------------

    def state(self) -> list[dict]:
        """Each endpoint: its base_url, slots, this process's figures, and its rest if any."""
        now = time.time()
        shown = []
        for endpoint, figures, rest in zip(self.endpoints, self.figures, self.rests, strict=True):
            record = rest.read()
            cooling = record is not None and not record["probed"]
            shown.append({
                "base_url": endpoint.base_url, "max_concurrent": endpoint.max_concurrent,
                "requests": figures.requests, "failures": figures.failures,
                "in_flight": figures.in_flight,
                "latency_ms": None if figures.latency_s is None else round(figures.latency_s * 1000, 1),
                "cooling": cooling,
                "cooling_s": round(max(0.0, record["until"] - now), 1) if cooling else 0.0,
                "reason": record["reason"] if record else None})
        return shown

    def close(self) -> None:
        """Cancel the timer and probes; release every slot lock."""
        if self._timer is not None:
            self._timer.cancel()
        for task in self._probing.values():
            task.cancel()
        self.slots.close()


@dataclass(frozen=True)
class SharedSlot:
    """The slot of a craftsman whose one server the cluster shares: one of the home's and one
    of the cluster's."""

    home: int
    cluster: int


class CraftSlots:
    """The slots dispatch takes for the craftsmen one worker serves: craft.limits.Slots for a
    craftsman with one base_url, an EndpointPool's Lease for one with several endpoints."""

    def __init__(self, run: Path, craftsmen: list[Craftsman],
                 wake: Callable[[], None] = lambda: None,
                 cluster: ClusterSlots | None = None) -> None:
        self.pools = {c.name: EndpointPool(c, run, wake, cluster)
                      for c in craftsmen if c.endpoints}
        self.plain = Slots(run / "slots", {c.name: c.max_concurrent for c in craftsmen
                                           if not c.endpoints})
        self.cluster = cluster
        self.base_urls = {c.name: c.base_url for c in craftsmen}
        # Craftsmen with one base_url the cluster shares: their cluster slots' keys.
        self.cluster_keys = {} if cluster is None else {
            c.name: key for c in craftsmen if not c.endpoints
            and (key := url_key(c.name, c.base_url)) in cluster.caps}

    def acquire(self, craftsman: str) -> int | Lease | SharedSlot | None:
        """A free slot of the craftsman (home-wide, and cluster-wide where the cluster shares
        its server), or None when none can be had now."""
        pool = self.pools.get(craftsman)
        if pool is not None:
            return pool.acquire()
        slot = self.plain.acquire(craftsman)
        key = self.cluster_keys.get(craftsman)
        if slot is None or key is None:
            return slot
        shared = self.cluster.take(key)
        if shared is None:  # asked for: its grant wakes the worker
            self.plain.release(craftsman, slot)
            return None
        return SharedSlot(slot, shared)

    def release(self, craftsman: str, slot: int | Lease | SharedSlot) -> None:
        """Give a slot back."""
        pool = self.pools.get(craftsman)
        if pool is not None:
            pool.release(slot)
        elif isinstance(slot, SharedSlot):
            self.plain.release(craftsman, slot.home)
            self.cluster.give(self.cluster_keys[craftsman], slot.cluster)
        else:
            self.plain.release(craftsman, slot)

    def idle(self, craftsman: str) -> None:
        """No task of the craftsman waits: the cluster slots this worker holds unused for it
        go back (a grant that came after its task went to another worker)."""
        pool = self.pools.get(craftsman)
        if pool is not None:
            pool.drop_spares()
        elif craftsman in self.cluster_keys:
            self.cluster.drop_spares(self.cluster_keys[craftsman])

    def endpoints(self) -> dict[str, list[dict]]:
        """Each pool's endpoints as `EndpointPool.state` shows them."""
        return {name: pool.state() for name, pool in self.pools.items()}

    def cluster_state(self) -> list[dict]:
        """Each server the cluster shares: the cluster slots this worker holds of it, in use
        and spare, against its cap across every host."""
        if self.cluster is None:
            return []
        shared = [(name, self.base_urls[name], key) for name, key in self.cluster_keys.items()]
        shared += [(name, endpoint.base_url, key) for name, pool in self.pools.items()
                   for endpoint, key in zip(pool.endpoints, pool.keys, strict=True)
                   if key in self.cluster.caps]
        shown = []
        for craftsman, base_url, key in sorted(shared):
            in_use, spare = self.cluster.held(key)
            shown.append({"craftsman": craftsman, "server": base_url or "(the provider's API)",
                          "cap": self.cluster.caps[key], "in_use": in_use, "spare": spare})
        return shown

    def close(self) -> None:
        """Release every lock."""
        for pool in self.pools.values():
            pool.close()
        self.plain.close()
