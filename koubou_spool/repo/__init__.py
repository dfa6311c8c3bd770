"""Repository tasks' git layer (PRODUCT.md §10): policy, mirrors, worktrees, diffs, verify, push.
Imports only the foundation and the spool core; it knows nothing of craftsmen or the worker."""

import importlib
from typing import Any

# What the package offers, by the module that defines it; loaded on first use, so that a worker
# or a command that needs only the policy does not import git, diffs and worktrees.
_DEFINED_IN = {name: module for module, names in {
    "changes": ("Changes", "PushRefused", "commit_changes", "commit_message", "push", "summary"),
    "context": ("RepoContext", "repo_context"),
    "diff": ("DiffNotApplied", "DiffRefused", "apply_diff", "extract_diff"),
    "git": ("GitError", "NotARepository"),
    "mirror": ("BaseNotFound", "mirror_lock", "mirror_path", "mirrors_size", "resolve_base",
               "update_mirror"),
    "policy": ("DEFAULT_AUTHOR", "RepoRefused", "RepoSettings", "allowed", "confidential"),
    "verify": ("run_verify",),
    "worktree": ("Workspace", "clean_up", "live_worktrees", "prepare", "prune", "push_result",
                 "read_journal", "stale_worktrees"),
}.items() for name in names}

__all__ = sorted(_DEFINED_IN)


def __getattr__(name: str) -> Any:
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_DEFINED_IN[name]}"), name)
