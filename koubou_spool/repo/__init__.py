"""Repository tasks' git layer (PRODUCT.md §10): policy, mirrors, worktrees, diffs, verify, push.
Imports only the foundation and the spool core; it knows nothing of craftsmen or the worker."""

from .changes import Changes, PushRefused, commit_changes, commit_message, push, summary
from .git import GitError, NotARepository
from .mirror import BaseNotFound, mirror_lock, mirror_path, mirrors_size, resolve_base, update_mirror
from .policy import DEFAULT_AUTHOR, RepoRefused, RepoSettings, allowed, confidential

__all__ = [
    "DEFAULT_AUTHOR", "BaseNotFound", "Changes", "GitError", "NotARepository", "PushRefused", "RepoRefused",
    "RepoSettings", "allowed", "commit_changes", "commit_message", "confidential", "mirror_lock",
    "mirror_path", "mirrors_size", "push", "resolve_base", "summary", "update_mirror",
]
