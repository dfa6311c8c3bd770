"""What an attempt changed: the commit koubou makes after the craftsman, its summary, and the push."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import git
from .git import GitError, StrPath
from .policy import AUTHOR_RE, DEFAULT_AUTHOR

TRAILER = "Koubou-Task"
SUBJECT_MAX = 100


class PushRefused(GitError):
    """The source refused the result branch (checked out there, or not a fast-forward)."""

    @property
    def lasting(self) -> bool:
        """Whether another attempt would be refused alike: the branch is checked out at the
        source, or holds commits the result lacks (every attempt starts from the base)."""
        return any(words in self.stderr for words in _LASTING)


_CHECKED_OUT = "refusing to update checked out branch"
_NOT_FAST_FORWARD = ("non-fast-forward", "fetch first")
_LASTING = (_CHECKED_OUT, *_NOT_FAST_FORWARD)


@dataclass(frozen=True)
class Changes:
    """The difference between an attempt's base and its result commit."""

    files_changed: int
    insertions: int
    deletions: int
    patch: bytes  # `git diff --binary base..HEAD`, for outputs/<id>/changes.patch

    @property
    def patch_text(self) -> str:
        """The patch as text, for a prompt (`{{ID.diff}}`)."""
        return self.patch.decode("utf-8", errors="replace")


def commit_message(content: str, task_id: str) -> str:
    """The task's first line, a blank line and the `Koubou-Task: <id>` trailer."""
    lines = (line.strip() for line in content.splitlines())
    first = next((line for line in lines if line), f"koubou task {task_id}")
    if len(first) > SUBJECT_MAX:
        first = first[:SUBJECT_MAX - 1].rstrip() + "…"
    return f"{first}\n\n{TRAILER}: {task_id}\n"


def _identity(author: str) -> dict[str, str]:
    match = AUTHOR_RE.fullmatch(author)
    if not match:
        raise ValueError(f"author {author!r} is not 'Name <email>'")
    name, email = re.fullmatch(r"(.+) <(.+)>", author).groups()
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
            "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}


def commit_changes(worktree: StrPath, message: str, author: str = DEFAULT_AUTHOR, *,
                   base_sha: str) -> str | None:
    """Commit everything the craftsman changed; the result commit, or None when nothing changed.

    Commits the agent made itself are kept: the result is HEAD whenever it moved from the base.
    Ignored files stay out. Signing and hooks are off: this commit is koubou's, not the user's.
    """
    git.stage_all(worktree)
    if git.has_staged(worktree):
        # whitespace cleanup only: the default would drop a first line starting with '#'.
        git.run("-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null", "commit", "--quiet",
                "--no-verify", "--cleanup=whitespace", "-F", "-", cwd=worktree, input=message.encode(),
                env=_identity(author))
    tip = git.head(worktree)
    return None if tip == base_sha else tip


def summary(worktree: StrPath, base_sha: str) -> Changes:
    """Files changed, insertions, deletions and the patch from `base_sha` to HEAD."""
    stats = git.numstat(worktree, base_sha)
    return Changes(files_changed=len(stats), insertions=sum(a or 0 for a, _, _ in stats),
                   deletions=sum(d or 0 for _, d, _ in stats), patch=git.patch(worktree, base_sha))


def push(repository: StrPath, source: str, branch: str, *, commit: str | None = None,
         timeout_s: float | None = None) -> None:
    """Push `branch` (or `commit`, the result, as that branch) from a mirror or worktree to the source.

    Give `commit` when the agent may have switched branches in its worktree: the result commit
    is then what lands on the branch.

    koubou/ branches are koubou's own, so a retry overwrites them (--force); any other branch
    must fast-forward. Pushing to a branch does not touch the source's working tree, so a user's
    uncommitted changes there stay as they are; git refuses the branch the source has checked out.
    """
    force = ["--force"] if branch.startswith("koubou/") else []
    ref = f"refs/heads/{branch}"
    try:
        git.run("-c", "core.hooksPath=/dev/null", "push", "--quiet", *force, "--", source,
                f"{commit or ref}:{ref}", cwd=Path(repository), timeout=timeout_s)
    except GitError as exc:
        raise PushRefused.reworded(exc, _refusal(exc.stderr, source, branch)) from None


def _refusal(stderr: str, source: str, branch: str) -> str:
    if _CHECKED_OUT in stderr:
        return (f"cannot push {branch} to {source}: it is the branch checked out there; check out "
                "another branch in that repository, or give the task another `branch`")
    if any(words in stderr for words in _NOT_FAST_FORWARD):
        return f"cannot push {branch} to {source}: the branch there has commits the result does not"
    return f"cannot push {branch} to {source}"
