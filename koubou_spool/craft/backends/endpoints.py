"""A craftsman with several endpoints: one OpenAI-compatible client per endpoint, and the
failover between them within one attempt (PRODUCT.md §12).

The request starts at the endpoint of the Lease dispatch took for it. A connection error,
timeout, 5xx or 429 there rests that endpoint for the whole home (craft.endpoints) and moves the
request to the best other endpoint with room, each endpoint once per attempt. When none is
left: if some endpoint took the request and failed at it (a 5xx, a timeout), the attempt fails
as any retryable failure does, so a request that breaks every server is not tried forever;
otherwise (refused connections, 429s, no room) it is Unavailable and goes back to pending/
without spending an attempt. An endpoint the cluster shares whose slot this worker does not hold
(a worker at its --concurrency holds no spare) is waited for, while the attempt has time left.
"""

from __future__ import annotations

import dataclasses
import time

from ...config import Craftsman
from ..endpoints import EndpointPool, Lease, PROBE_S
from . import BackendError, Reply, Request, Unavailable
from .openai_chat import OpenAIChatBackend

MARGIN_S = 0.5  # an endpoint's timeout ends this much before the attempt's, so failing it cools it
# Less time than this left in the attempt: no other endpoint is tried, since a timeout there
# would be the attempt's doing, not the endpoint's.
LEAST_S = 5.0


class EndpointsBackend:
    """The endpoints' clients over their pool; the pool's probe is theirs."""

    def __init__(self, craftsman: Craftsman, pool: EndpointPool) -> None:
        self.craftsman = craftsman
        self.pool = pool
        self.clients = [OpenAIChatBackend(craftsman, e) for e in craftsman.endpoints]
        pool.probe = self.probe

    async def probe(self, index: int) -> bool:
        """Whether the endpoint's GET /models answers within PROBE_S."""
        return await self.clients[index].probe(PROBE_S)

    async def complete(self, request: Request) -> Reply:
        """The reply of the first endpoint that answers; BackendError or Unavailable."""
        lease = request.lease if isinstance(request.lease, Lease) else None
        if lease is not None:
            return await self._failover(request, lease)
        lease = self.pool.acquire()  # a call from outside dispatch: its own slot
        if lease is None:
            raise Unavailable(self._resting())
        try:
            return await self._failover(request, lease)
        finally:
            self.pool.release(lease)

    async def _failover(self, request: Request, lease: Lease) -> Reply:
        deadline = time.monotonic() + request.timeout_s - MARGIN_S
        tried: set[int] = set()
        failures: list[BackendError] = []
        while True:
            left = deadline - time.monotonic()
            if failures and left < min(LEAST_S, request.timeout_s / 4):
                raise self._out_of_endpoints(failures)
            if lease.index in tried or not self.pool.usable(lease.index):
                # a grant may be waited for as long as the request keeps time enough to run
                within = left - min(LEAST_S, request.timeout_s / 4)
                if not await self.pool.move_waiting(lease, tried, within):
                    raise self._out_of_endpoints(failures)
                left = deadline - time.monotonic()  # the wait, if any, took some
            index = lease.index
            tried.add(index)
            try:
                return await self._send(index, request, max(0.1, left))
            except BackendError as exc:
                if not exc.endpoint_fault:
                    raise
                failures.append(exc)

    async def _send(self, index: int, request: Request, timeout_s: float) -> Reply:
        self.pool.sent(index)
        started = time.monotonic()
        try:
            reply = await self.clients[index].complete(
                dataclasses.replace(request, timeout_s=timeout_s, lease=None))
        except BackendError as exc:
            if exc.endpoint_fault:
                self.pool.failed(index, str(exc), exc.retry_after)
            else:  # the server answered; the request, not the endpoint, was at fault
                self.pool.answered(index, time.monotonic() - started)
            raise
        except BaseException:
            self.pool.aborted(index)
            raise
        self.pool.answered(index, time.monotonic() - started)
        reply.details["endpoint"] = self.craftsman.endpoints[index].base_url
        return reply

    def _out_of_endpoints(self, failures: list[BackendError]) -> BackendError:
        reached = [f for f in failures if f.reached]
        if reached:  # a server took the request and failed at it: that costs an attempt
            last = reached[-1]
            return BackendError(f"every endpoint of {self.craftsman.name} failed; last: {last}",
                                kind=last.kind, retryable=True)
        tried = "; ".join(str(f) for f in failures)
        return Unavailable(f"no endpoint of {self.craftsman.name} can take the request now"
                           + (f" ({tried})" if tried else f": {self._resting()}"))

    def _resting(self) -> str:
        states = self.pool.state()
        return ", ".join(f"{s['base_url']} " + (f"resting {s['cooling_s']:g} s" if s["cooling"]
                                                 else "full") for s in states)

    async def close(self) -> None:
        """Close every client."""
        for client in self.clients:
            await client.close()
