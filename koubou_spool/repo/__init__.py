"""Repository tasks' git layer (PRODUCT.md §10): policy, mirrors, worktrees, diffs, verify, push.
Imports only the foundation and the spool core; it knows nothing of craftsmen or the worker."""

from .changes import Changes, PushRefused, commit_changes, commit_message, push, summary
from .context import RepoContext, repo_context
from .diff import DiffNotApplied, DiffRefused, apply_diff, extract_diff
from .git import GitError, NotARepository
from .mirror import BaseNotFound, mirror_lock, mirror_path, mirrors_size, resolve_base, update_mirror
from .policy import DEFAULT_AUTHOR, RepoRefused, RepoSettings, allowed, confidential
from .verify import run_verify
from .worktree import (Workspace, clean_up, live_worktrees, prepare, prune, push_result, read_journal,
                       stale_worktrees)

__all__ = [
    "DEFAULT_AUTHOR", "BaseNotFound", "Changes", "DiffNotApplied", "DiffRefused", "GitError",
    "NotARepository", "PushRefused", "RepoContext", "RepoRefused", "RepoSettings", "Workspace", "allowed",
    "apply_diff", "clean_up", "commit_changes", "commit_message", "confidential", "extract_diff",
    "live_worktrees", "mirror_lock", "mirror_path", "mirrors_size", "prepare", "prune", "push",
    "push_result", "read_journal", "repo_context", "resolve_base", "run_verify", "stale_worktrees",
    "summary", "update_mirror",
]
