"""Repository tasks: a craftsman works in a worktree of the task's repository, and the result is a
commit on a branch, verified by the repository's own tests (README: Repository tasks).

prepare: the mirror is fetched and a worktree made at HOME/work/<id> on `koubou/<id>` from the
base (every attempt starts from the base again). A command craftsman runs in it, with
KOUBOU_WORKTREE and KOUBOU_BASE_SHA in its environment; an LLM craftsman is shown the file list
and the named files and answers with a unified diff, applied with `git apply --3way`.
finish: commit what changed, run `verify`, push, keep the patch in outputs/<id>/changes.patch.
close: a finished attempt's worktree goes; a failed one's stays for `koubou maintain`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from ..craft.backends import BackendError, Reply, Request
from ..craft.prompt import messages_for
from ..errors import InvalidTask
from ..repo import changes, diff, worktree
from ..repo.context import repo_context
from ..repo.git import GitError, NotARepository
from ..repo.mirror import BaseNotFound
from ..repo.policy import RepoRefused, RepoSettings
from ..repo.verify import run_verify
from ..spool import durable, permissions
from .kinds import (Attempt, base_request, forget_feedback, remember_feedback, reply_fields,
                    with_feedback, with_references)

log = logging.getLogger(__name__)

CONTEXT_BYTES = 200_000  # what an LLM craftsman is shown of the repository, at most
DIFF_INSTRUCTIONS = """\
You are working on a git repository. Answer with one unified diff (as `git diff` prints it,
paths relative to the repository root, inside a ```diff block) that makes the change asked for
below. Change only what is needed; do not explain outside the diff."""


class RepositoryWork:
    """One attempt at a repository task."""

    def __init__(self, settings: RepoSettings) -> None:
        self.settings = settings
        self.workspace: worktree.Workspace | None = None

    async def prepare(self, attempt: Attempt) -> Request:
        """A fresh worktree from the base, and the request for this craftsman."""
        task = attempt.task
        self.home = Path(attempt.home)
        try:
            self.workspace = await asyncio.to_thread(
                worktree.prepare, self.home, task.id, task.repo, self.settings,
                base=task.base, branch=task.branch)
        except RepoRefused as exc:
            raise BackendError(str(exc), kind="policy") from None
        except (InvalidTask, NotARepository, BaseNotFound) as exc:
            raise BackendError(str(exc), kind="invalid") from None
        except GitError as exc:  # a fetch that failed may work next time
            raise BackendError(str(exc), kind="backend", retryable=True) from None
        if attempt.craftsman.backend == "command":
            return self._agent_request(attempt)
        return await self._diff_request(attempt)

    def _agent_request(self, attempt: Attempt) -> Request:
        workspace = self.workspace
        task, confidential = with_references(attempt)
        messages = messages_for(task, attempt.craftsman.system, attempt.attachments)
        request = base_request(attempt, with_feedback(attempt, messages),
                               workdir=str(workspace.path))
        request.confidential = request.confidential or confidential
        request.env.update(KOUBOU_WORKTREE=str(workspace.path),
                           KOUBOU_BASE_SHA=workspace.base_sha, KOUBOU_BRANCH=workspace.branch)
        request.writable = [str(workspace.mirror)]  # a sandboxed agent's commits land there
        request.read_only = worktree.guarded_paths(workspace)
        return request

    async def _diff_request(self, attempt: Attempt) -> Request:
        task, confidential = with_references(attempt)
        context = await asyncio.to_thread(repo_context, self.workspace.path, task.files,
                                          CONTEXT_BYTES)
        system = DIFF_INSTRUCTIONS
        if task.system or attempt.craftsman.system:
            system = f"{task.system or attempt.craftsman.system}\n\n{DIFF_INSTRUCTIONS}"
        prompt = f"{task.content}\n\n{context.text}"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        request = base_request(attempt, with_feedback(attempt, messages),
                               workdir=str(self.workspace.path))
        request.confidential = request.confidential or confidential
        return request

    async def finish(self, attempt: Attempt, reply: Reply) -> dict[str, Any]:
        """Apply (LLM), commit, verify, push; the result's `repo` fields."""
        workspace, task = self.workspace, attempt.task
        if attempt.craftsman.backend != "command":
            await self._apply(attempt, reply.content)
        commit = await asyncio.to_thread(
            changes.commit_changes, workspace.path, changes.commit_message(task.content, task.id),
            self.settings.author, base_sha=workspace.base_sha)
        verified = await self._verify(attempt)
        summary = await asyncio.to_thread(changes.summary, workspace.path, workspace.base_sha)
        pushed = False
        if commit is not None and (task.push if task.push is not None else self.settings.push):
            await self._push(workspace, commit)
            pushed = True
        return reply_fields(reply) | {"repo": {
            "repo": task.repo, "base": task.base, "base_sha": workspace.base_sha,
            "branch": workspace.branch, "commit": commit,
            "files_changed": summary.files_changed, "insertions": summary.insertions,
            "deletions": summary.deletions, "patch": _save_patch(attempt, summary.patch),
            "pushed": pushed, "verify": verified}}

    async def _apply(self, attempt: Attempt, answer: str) -> None:
        try:
            await asyncio.to_thread(diff.apply_diff, self.workspace.path, answer)
        except (diff.DiffRefused, GitError) as exc:
            remember_feedback(attempt, f"its diff could not be applied: {exc}")
            raise BackendError(f"the answer is not a diff that applies: {exc}",
                               kind="invalid_output", retryable=True) from None

    async def _verify(self, attempt: Attempt) -> dict[str, Any] | None:
        """Run the task's verify argv in the worktree; a failure fails the attempt as `verify`."""
        argv = attempt.task.verify
        if not argv:
            return None
        # Its processes carry the claim, as the agent's do: whoever takes the claim over after
        # a kill -9 of this worker stops them (spool.recovery.reap). Cancelled (a cancel, the
        # worker out of its grace), the attempt stops them itself.
        stop = threading.Event()
        try:
            outcome = await asyncio.to_thread(
                run_verify, argv, self.workspace.path, self.settings.verify_timeout_s,
                env={"KOUBOU_CLAIM": attempt.claim} if attempt.claim else None, stop=stop)
        except asyncio.CancelledError:
            stop.set()
            raise
        if outcome["exit_code"] == 0 and not outcome.get("timed_out"):
            return outcome
        what = ("timed out" if outcome.get("timed_out")
                else f"exited with status {outcome['exit_code']}")
        tail = outcome.get("output_tail", "")[-1500:]
        remember_feedback(attempt, f"the verify command `{' '.join(argv)}` {what}; the end of "
                                   f"its output:\n{tail}")
        raise BackendError(f"verify {' '.join(argv)} {what}: {tail[-2000:]}", kind="verify",
                           retryable=True)

    async def _push(self, workspace: worktree.Workspace, commit: str) -> None:
        try:
            await asyncio.to_thread(worktree.push_result, self.home, workspace, commit)
        except changes.PushRefused as exc:  # another run of the agent would meet the same
            raise BackendError(f"push of {workspace.branch} failed: {exc}",
                               retryable=not exc.lasting) from None
        except GitError as exc:  # the source unreachable: another attempt may get through
            raise BackendError(f"push of {workspace.branch} failed: {exc}",
                               retryable=True) from None

    async def close(self, attempt: Attempt, succeeded: bool) -> None:
        """A finished attempt's worktree goes (its branch stays); a failed one's is kept for
        `koubou maintain`, and the next attempt starts from the base anyway."""
        if succeeded and self.workspace is not None:
            forget_feedback(attempt)
            await asyncio.to_thread(worktree.clean_up, Path(attempt.home), attempt.task.id,
                                    keep_branch=True)


def _save_patch(attempt: Attempt, patch: bytes) -> str:
    """outputs/<id>/changes.patch, written whole; its path relative to the home."""
    folder = Path(attempt.home) / "outputs" / attempt.task.id
    permissions.make_dir(folder, permissions.OWNER_DIR, parents=True)
    durable.write_atomic(folder / "changes.patch", patch)
    return f"outputs/{attempt.task.id}/changes.patch"
