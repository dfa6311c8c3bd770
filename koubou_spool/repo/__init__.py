"""Repository tasks' git layer (PRODUCT.md §10): policy, mirrors, worktrees, diffs, verify, push.
Imports only the foundation and the spool core; it knows nothing of craftsmen or the worker."""

from .changes import Changes, PushRefused, commit_changes, commit_message, push, summary
from .git import GitError, NotARepository
from .mirror import BaseNotFound, mirror_lock, mirror_path, mirrors_size, resolve_base, update_mirror
from .policy import DEFAULT_AUTHOR, RepoRefused, RepoSettings, allowed, confidential
from .worktree import (Workspace, clean_up, live_worktrees, prepare, prune, push_result, read_journal,
                       stale_worktrees)

__all__ = [
    "DEFAULT_AUTHOR", "BaseNotFound", "Changes", "GitError", "NotARepository", "PushRefused", "RepoRefused",
    "RepoSettings", "Workspace", "allowed", "clean_up", "commit_changes", "commit_message", "confidential",
    "live_worktrees", "mirror_lock", "mirror_path", "mirrors_size", "prepare", "prune", "push",
    "push_result", "read_journal", "resolve_base", "stale_worktrees", "summary", "update_mirror",
]
