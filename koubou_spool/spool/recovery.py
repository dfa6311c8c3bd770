"""Recovery: claims whose worker died or missed its lease go back to pending/, or fail as lost.

Run by every live worker (at start and at each heartbeat) and by `koubou maintain`. Taking a
claim over is a rename of in_progress/NAME@OLD to NAME@NEW: one recoverer wins, and the old
owner, if it was only stopped (SIGSTOP, a long GC pause), finds its claim gone and discards its
result: the fence of spool.publish.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import task as task_format
from ..config import SpoolSettings
from ..errors import InvalidTask
from .ledger import LedgerWriter
from .entries import BRIDGE_PREFIX
from .files import CLAIM_RE, Claim, Refused, Spool, Unavailable

log = logging.getLogger(__name__)

LEDGER_WAIT_S = 1.0


@dataclass(frozen=True)
class Recovered:
    """What happened to one orphaned claim: requeued, lost (failed), kept (its outcome had
    landed) or rejudged (not a readable task: back to pending/ to be rejected there)."""

    name: str
    task_id: str | None
    action: str


def recover_orphans(spool: Spool, settings: SpoolSettings, owner_id: str, ledger: LedgerWriter,
                    settle_lost: Callable[[str], None] | None = None, *,
                    keep_faces: bool = False) -> list[Recovered]:
    """Take over every claim of a dead or lease-expired worker and settle its fate.

    With `keep_faces` (the home has cluster.dsn_env) a dead bridge's claims are left as they are:
    they are the faces of tasks that left for the cluster, which another host may hold, and
    the next bridge adopts them (spool/bridge.py, adopt_faces). Put back in pending/, a worker
    here serving their craftsman would run them beside that host.

    One orphan that cannot be settled (ENOSPC, EMFILE, a file that vanished half-way) is
    logged and given back under its old name, for the next round: it never stops the others.
    """
    done = []
    for entry, state in spool.orphaned_claims(settings.lease_s):
        match = CLAIM_RE.fullmatch(entry)
        if match["worker"] == owner_id:
            continue  # our own, seen stale from this thread while our loop was held up
        if keep_faces and match["worker"].startswith(BRIDGE_PREFIX):
            continue
        mine = spool.take_over(entry, owner_id)
        if mine is None:
            continue  # another recoverer was first
        log.warning("took over %s from %s worker %s", match["name"], state, match["worker"])
        stopped = reap(entry.removesuffix(".fin"))
        if stopped:
            log.warning("stopped %d process(es) left running for %s", stopped, match["name"])
        try:
            if match["worker"].startswith(BRIDGE_PREFIX):
                done.append(_bridged(spool, mine, match["fin"]))
            elif match["fin"]:
                done.append(_finishing(spool, settings, mine, ledger, settle_lost))
            else:
                done.append(_claim(spool, settings, mine, ledger, settle_lost))
        except Exception as exc:
            log.error("could not recover %s: %s; trying again later", match["name"], exc)
            give_back(spool, mine, entry)
    return done


def reap(claim_file: str) -> int:
    """SIGKILL what still runs for a claim taken over; how many processes.

    A CLI agent dies with its worker (PR_SET_PDEATHSIG), but its own children (a build, a test
    run, a shell it left behind) do not, and would go on writing in a worktree the next attempt
    starts afresh. They carry the claim's name in KOUBOU_CLAIM (work.kinds.base_request), which
    names one attempt of one task: nothing else carries it. Processes of other users cannot be
    read, and are not ours to stop.
    """
    marker = f"KOUBOU_CLAIM={claim_file}".encode()
    stopped = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as stream:
                environment = stream.read().split(b"\0")
        except OSError:
            continue  # gone, or another user's
        if marker in environment:
            try:
                os.kill(int(entry), signal.SIGKILL)
                stopped += 1
            except ProcessLookupError:
                pass
    return stopped


def give_back(spool: Spool, claim: Claim, entry: str) -> None:
    """Put an orphan we could not settle back under its dead owner's name, for the next
    round."""
    for held in (claim.file_name, claim.file_name + ".fin"):
        try:
            os.rename(spool.in_progress / held, spool.in_progress / entry)
            return
        except OSError:
            continue  # moved on (requeued, published) before it failed, or gone


def _finishing(spool: Spool, settings: SpoolSettings, claim: Claim, ledger: LedgerWriter,
               settle_lost: Callable[[str], None] | None) -> Recovered:
    """A worker died while publishing: keep its outcome if it landed, else run the task again."""
    path = spool.in_progress / (claim.file_name + ".fin")
    try:
        task = task_format.parse(path.read_bytes(), task_format.id_from_name(claim.name))
    except (OSError, InvalidTask):
        task = None
    if task is not None and spool.outcome_state(task.id) is not None:
        # Its worker may have died between the rename and the round's fsync: make the outcome
        # durable before the marker that would run the task again goes.
        spool.sync_outcomes()
        _record_kept(spool, ledger, task.id)
        path.unlink()
        return Recovered(claim.name, task.id, "kept")
    os.rename(path, spool.in_progress / claim.file_name)
    return _claim(spool, settings, claim, ledger, settle_lost)


def _record_kept(spool: Spool, ledger: LedgerWriter, task_id: str) -> None:
    """Record an outcome that landed while its worker died before the ledger had it (a worker
    removes its marker only after the record; one recorded already is written again, the same)."""
    try:
        record = spool.outcome(task_id)
    except (OSError, ValueError):
        return
    if not isinstance(record, dict):
        return
    try:
        if record.get("status") == "completed":
            result = record["result"]
            recorded = ledger.attempt_finished(
                task_id, result["attempts"], "completed",
                finished_at=task_format.parse_iso(result["finished_at"]), usage=result["usage"],
                cost_usd=result.get("cost_usd"), model=result.get("model"), record=record)
        else:
            error = record["error"]
            recorded = ledger.attempt_finished(
                task_id, error["attempts"], "failed", finished_at=task_format.parse_iso(error["at"]),
                error_kind=error["kind"], message=error["message"], record=record)
    except (KeyError, TypeError, ValueError):
        return  # not an outcome this version wrote: `koubou ledger rebuild` reads what it can
    if not ledger.backlog:
        concurrent.futures.wait([recorded], timeout=LEDGER_WAIT_S)


def _bridged(spool: Spool, claim: Claim, fin: str | None) -> Recovered:
    """A dead bridge's claim in a home no longer in a cluster: no attempt ran here, so it goes
    back to pending/ uncounted (were the cluster back, the next bridge would forward it again,
    once in the cluster: the insert is idempotent on the id); one whose outcome it was
    delivering when it died keeps that outcome."""
    if fin and delivered_face(spool, claim):
        return Recovered(claim.name, task_format.id_from_name(claim.name), "kept")
    spool.requeue(claim.file_name, None)
    return Recovered(claim.name, task_format.id_from_name(claim.name), "requeued")


def delivered_face(spool: Spool, claim: Claim) -> bool:
    """A bridge's face taken over with its finishing marker (it died delivering the task's
    outcome): whether the outcome had landed. Then the marker goes, once the outcome is
    durable (as in _finishing); else the face is a plain claim again."""
    path = spool.in_progress / (claim.file_name + ".fin")
    task_id = task_format.id_from_name(claim.name)
    if task_id is not None and spool.outcome_state(task_id) is not None:
        spool.sync_outcomes()
        path.unlink()
        return True
    os.rename(path, spool.in_progress / claim.file_name)
    return False


def _claim(spool: Spool, settings: SpoolSettings, claim: Claim, ledger: LedgerWriter,
           settle_lost: Callable[[str], None] | None) -> Recovered:
    try:
        data, _ = spool.read_claim(claim)
        task = task_format.parse(data, task_format.id_from_name(claim.name))
    except (Refused, Unavailable, InvalidTask):
        spool.requeue(claim.file_name, None)
        return Recovered(claim.name, None, "rejudged")
    attempt = task.attempts + 1
    now = time.time()
    recorded = ledger.attempt_finished(
        task.id, attempt, "lost", finished_at=now, error_kind="lost",
        message="its worker died or missed its lease during the attempt")
    # Recovery is rare: let its record land before the requeue, so a recoverer killed in turn
    # leaves no requeued task without its lost attempt (unless the ledger is locked: then
    # no wait at all, or a dozen orphans would take a minute).
    if not ledger.backlog:
        concurrent.futures.wait([recorded], timeout=LEDGER_WAIT_S)
    if settle_lost is not None:
        settle_lost(task.id)  # the call may have been billed: the reservation stands
    if attempt >= (task.max_attempts or settings.max_attempts):
        record = task_format.failed_record(task.raw, "lost", f"its worker died or missed its "
                                           f"lease during {attempt} attempts", attempt, now)
        ledger.task_finished(record)
        spool.publish(claim, task.id, record)
        return Recovered(claim.name, task.id, "lost")
    spool.requeue(claim.file_name, attempt)
    return Recovered(claim.name, task.id, "requeued")
