"""The attempt: a claimed task → its kind of work → the craftsman's reply → publish.

The budget is reserved (worst case) before the call and settled with the real cost after it,
on every path: a call that may have been billed keeps its reservation. A revoked claim (cancel,
lease takeover) aborts the call and publishes nothing; a stopping worker out of grace gives the
task back uncounted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..config import Config, Craftsman
from ..craft.backends import Backend, BackendError, Reply, Request, Unavailable, ready
from ..craft.pricing import cost_of
from ..craft.spending import BudgetExhausted, Spending
from ..errors import InvalidTask
from ..spool import task as task_format
from ..spool.files import Claim, duplicate_reason
from ..spool.ledger import LedgerWriter
from ..spool.task import Task
from .intake import Intake
from .kinds import Attempt, TextWork, Work
from .publish import Publisher
from .repository import RepositoryWork

log = logging.getLogger(__name__)


class Attempts:
    """Runs the attempts of one worker."""

    def __init__(self, config: Config, worker_id: str, intake: Intake, publisher: Publisher,
                 spending: Spending, ledger: LedgerWriter, backends: dict[str, Backend],
                 backend_errors: dict[str, str], is_revoked: Callable[[Claim], bool]) -> None:
        self.config = config
        self.worker_id = worker_id
        self.intake = intake
        self.publisher = publisher
        self.spending = spending
        self.ledger = ledger
        self.backends = backends
        self.backend_errors = backend_errors
        self.is_revoked = is_revoked
        # The slot dispatch holds for a claim: for a craftsman with endpoints, the endpoint
        # the request starts at (the worker sets it to Dispatch.slot).
        self.slot_of: Callable[[Claim], object] = lambda claim: None
        self.home = str(intake.spool.home)

    async def run(self, claim: Claim, craftsman_name: str) -> None:
        """One attempt at a claimed task, to its outcome or its requeue.

        An error no path below foresaw must not leave the claim held by a live worker, where
        nothing would ever recover it: the claimed file goes to failed/ with the error."""
        try:
            await self._run(claim, craftsman_name)
        except Exception as exc:
            log.exception("attempt at %s failed unexpectedly", claim.name)
            self.give_up(claim, f"the worker could not run this task: {exc}")

    def give_up(self, claim: Claim, reason: str) -> None:
        """Move a claim nothing else can be done with to failed/, with the reason."""
        self.publisher.let_go(claim)
        self.intake.reject_safely(self.intake.spool.in_progress, claim.file_name, reason)

    async def _run(self, claim: Claim, craftsman_name: str) -> None:
        attempt = await self._begin(claim, craftsman_name)
        if attempt is None:
            return
        task = attempt.task
        self.ledger.attempt_started(task.id, attempt.number, self.worker_id, craftsman_name,
                                    task.model or attempt.craftsman.model, claim.claimed_at)
        if task.expires_at is not None and task.expires_at <= time.time():
            self.publisher.fail(claim, task, "expired", f"not started before expires_at "
                                      f"{task.raw.get('expires_at')}", attempt.number)
            return
        try:
            await self._work(claim, attempt)
        except BudgetExhausted as exc:
            await self._budget_exhausted(claim, task, attempt.number, exc)
        except asyncio.CancelledError:
            if self.is_revoked(claim):
                log.warning("claim on %s was revoked (cancelled or taken over); its request "
                            "was aborted", task.id)
                return
            # Stopping and out of grace: give the task back uncounted; it was not its fault.
            self.publisher.requeue(claim, None)
            raise
        except Unavailable as exc:  # no endpoint could take it: not the task's fault
            log.info("%s waits in pending/: %s", task.id, exc)
            self.publisher.requeue(claim, None)
        except BackendError as exc:
            await self._failed_attempt(claim, task, attempt.number, exc)
        except Exception as exc:  # a bug in a kind of work must fail one attempt, not strand it
            log.exception("attempt %d of %s failed unexpectedly", attempt.number, task.id)
            await self._failed_attempt(claim, task, attempt.number, BackendError(
                f"internal error: {type(exc).__name__}: {exc}", retryable=True))

    async def _begin(self, claim: Claim, craftsman_name: str) -> Attempt | None:
        """The claimed task, routed again if anything changed since it was queued; None when
        it was rejected, failed or requeued instead."""
        recalled = self.intake.recalled(claim)
        task, decision = recalled if recalled else (self.intake.read_claimed(claim), None)
        if task is None:
            return None
        finished = self.intake.finished(task)
        if finished:  # another file with this id ran since this one was queued
            self.give_up(claim, duplicate_reason(task.id, finished))
            return None
        attachments = []
        if decision is None:  # judged again: the file, its attachments or the budget changed
            try:
                attachments = self.intake.routes.attachments(task)
                decision = self.intake.routes.route(task, attachments)
            except InvalidTask as exc:
                self.publisher.fail(claim, task, "invalid", str(exc), task.attempts + 1)
                return None
        if decision.craftsman != craftsman_name:
            self.publisher.requeue(claim, None)
            return None
        return Attempt(task, self.config.craftsmen[craftsman_name], task.attempts + 1, decision,
                       self.home, attachments, claim.file_name)

    async def _work(self, claim: Claim, attempt: Attempt) -> None:
        """Prepare, call and finish through the task's kind of work, then publish."""
        work = self.work_for(attempt.task)
        succeeded = False
        try:
            request = await work.prepare(attempt)
            request.lease = self.slot_of(claim)
            reply = await self._call(attempt.craftsman, attempt, request)
            fields = await work.finish(attempt, reply)
            succeeded = True
        finally:
            await work.close(attempt, succeeded)
        await self._complete(claim, attempt, reply, fields)

    def work_for(self, task: Task) -> Work:
        """The kind of work a task asks for: work on a repository, or a text answer."""
        return RepositoryWork(self.intake.routes.repos) if task.repo else TextWork()

    async def _call(self, craftsman: Craftsman, attempt: Attempt, request: Request) -> Reply:
        """The craftsman's reply, with the budget reserved before and settled after."""
        if craftsman.name in self.backend_errors:
            raise BackendError(self.backend_errors[craftsman.name])
        # The craftsman's max_tokens is a ceiling, not only a default: it is what the operator
        # let one call of this craftsman cost, and what bounds every reservation, so a task
        # asking 10**9 gets the ceiling (and `truncated` says so) rather than a refusal.
        request.max_tokens = min(request.max_tokens, craftsman.max_tokens)
        reservation = await self.spending.reserve(craftsman, attempt.task.id, attempt.number,
                                                  request)
        try:
            reply = await self._guarded_call(craftsman, request)
        except Unavailable:  # no server took the request: nothing was billed
            if reservation is not None:
                await self.spending.settle(reservation, 0.0)
            raise
        except BaseException:
            if reservation is not None:  # the call may have been billed: keep the reservation
                await self.spending.settle(reservation, None)
            raise
        reply.cost_usd = cost_of(craftsman, request.model, reply.usage, reply.cost_usd)
        if reservation is not None:
            await self.spending.settle(reservation, reply.cost_usd)
        return reply

    async def _guarded_call(self, craftsman: Craftsman, request: Request) -> Reply:
        await ready(craftsman)
        try:
            # asyncio.timeout, not wait_for: no second task and future per call.
            async with asyncio.timeout(request.timeout_s):
                return await self.backends[craftsman.name].complete(request)
        except TimeoutError:
            raise BackendError(f"{craftsman.name} did not answer within {request.timeout_s:g} s",
                               kind="timeout", retryable=True) from None
        except (BackendError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug in a backend must fail one task, not the worker
            log.exception("backend %s failed unexpectedly", craftsman.name)
            raise BackendError(f"internal error in backend {craftsman.backend}: {exc}") from None

    async def _complete(self, claim: Claim, attempt: Attempt, reply: Reply,
                        fields: dict) -> None:
        finished = time.time()
        cost = reply.cost_usd  # priced in _call, by the model asked for
        task = attempt.task
        queued = task.submitted_at or claim.claimed_at
        result = {
            **fields, "craftsman": attempt.craftsman.name, "model": reply.model,
            "worker_id": self.worker_id, "usage": reply.usage,
            "cost_usd": None if cost is None else round(cost, 8),
            "attempts": attempt.number, "queued_at": task_format.iso(queued),
            "started_at": task_format.iso(claim.claimed_at),
            "finished_at": task_format.iso(finished),
            "duration_s": round(time.monotonic() - claim.clock, 3)}
        self.publisher.complete(claim, task, attempt.number, result, cost)

    async def _budget_exhausted(self, claim: Claim, task: Task, attempt: int,
                                error: BudgetExhausted) -> None:
        """The reservation did not fit: per when_exhausted, go local, wait, or fail; a call
        that could never fit fails at once."""
        message = str(error)
        if error.final or self.spending.budget.settings.when_exhausted == "fail":
            self.publisher.fail(claim, task, "budget", message, attempt)
            return
        log.info("budget exhausted for %s (%s); requeued", task.id, message)
        self.publisher.requeue(claim, None)  # routed again: local, or deferred

    async def _failed_attempt(self, claim: Claim, task: Task, attempt: int,
                              error: BackendError) -> None:
        limit = task.max_attempts or self.config.spool.max_attempts
        if error.retryable and attempt < limit:
            log.warning("attempt %d/%d of %s failed, requeued: %s", attempt, limit, task.id, error)
            self.publisher.retry(claim, task, attempt, error.kind, str(error))
            return
        self.publisher.fail(claim, task, error.kind, str(error), attempt)

    # --- claims no craftsman can take -----------------------------------------------------------

    def unroutable(self, claim: Claim) -> None:
        """A claimed task that routes nowhere: fail it with the reason, or requeue it when
        things changed since it was queued."""
        try:
            self._unroutable(claim)
        except Exception as exc:  # as in run: never a claim left behind
            log.exception("could not settle unroutable %s", claim.name)
            self.give_up(claim, f"the worker could not route this task: {exc}")

    def _unroutable(self, claim: Claim) -> None:
        task = self.intake.read_claimed(claim)
        if task is None:
            return
        if task.after and self.intake.dependencies(task) == "failed":
            failed = [d for d in task.after if (self.intake.spool.outcome(d) or {}).get("status")
                      not in (None, "completed")]
            self.publisher.fail_now(claim, task, "dependency",
                                    f"it runs after {', '.join(failed)}, which failed",
                                    task.attempts)
            return
        try:
            decision = self.intake.routes.route(task)
        except InvalidTask as exc:
            self.publisher.fail_now(claim, task, "invalid", str(exc), task.attempts)
            return
        if decision.craftsman is not None or decision.kind == "defer":
            self.publisher.requeue(claim, None)  # things changed: judge it again
            return
        self.publisher.fail_now(claim, task, decision.kind or "policy", decision.reason,
                                task.attempts)
