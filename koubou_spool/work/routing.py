"""Routing a task as a worker sees it: its attachments read, its repository judged against
`repos.allowed`, and the budget's state, before craft.router picks the craftsman."""

from __future__ import annotations

from ..config import Config
from ..craft import router
from ..craft.attach import Attachment, read_attachments
from ..craft.limits import Budget
from ..errors import InvalidTask
from ..repo import policy as repo_policy
from ..repo.context import files_at_base
from ..repo.policy import RepoRefused, RepoSettings
from ..spool.task import Task


class Routes:
    """Routes tasks for one worker (its intake at judging, its attempts at claiming)."""

    def __init__(self, config: Config, budget: Budget) -> None:
        self.config = config
        self.budget = budget
        self.repos = RepoSettings.parse(config.repos)

    def attachments(self, task: Task) -> list[Attachment]:
        """The task's attached files; InvalidTask for any that cannot be read, however.
        A repository task's files are paths in its repository, read in its worktree."""
        if task.repo:
            return []
        try:
            return read_attachments(task.files, self.config.attach)
        except InvalidTask:
            raise
        except (OSError, RuntimeError, ValueError) as exc:  # a link loop, a NUL in a path
            raise InvalidTask(f"files: cannot be read: {exc}") from None

    def route(self, task: Task, attachments: list[Attachment] | None = None) -> router.Route:
        """Route with the attachments' text and the budget's state; InvalidTask for bad files.

        A repository task's `files` are paths in its repository: judged against
        `repos.allowed` first, before any git command runs, then read as its base has them
        (a local repository's; nothing is fetched to route) and scanned as attachments are."""
        confidential = False
        if task.repo:
            try:
                location = repo_policy.check_allowed(task.repo, self.repos)
            except RepoRefused as exc:
                return router.Route(None, str(exc), "policy")
            confidential = repo_policy.confidential(task.repo, self.repos)
            attachments = [] if confidential else [
                Attachment("", text) for text in files_at_base(location, task.base, task.files)]
        if attachments is None:
            attachments = self.attachments(task)
        return router.route(task, self.config, attachments=[a.text for a in attachments],
                            budget_exhausted=self.budget.exhausted(), confidential=confidential)
