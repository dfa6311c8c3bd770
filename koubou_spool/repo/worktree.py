"""The worktree of one attempt (HOME/work/<task id>/), its journal, and the clean-up of both.

Each side effect on a mirror is written to the task's journal (HOME/run/worktrees/<id>.json)
before it is made, so whoever finds the journal of a dead attempt knows what to undo: the
worktree, its registration in the mirror, and the branch unless it was pushed. The journal goes
last, once everything it names is gone. A journal with no worktree (the attempt died before
`git worktree add` ran) is undone the same way: every step tolerates what is already gone.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidTask
from ..spool import durable
from ..spool.task import ID_RE
from . import changes, git, mirror as mirrors
from .git import GitError
from .policy import RepoSettings, check_allowed, is_url

log = logging.getLogger(__name__)

NO_HOOKS = ("-c", "core.hooksPath=/dev/null")  # koubou's own git commands run no user hooks
DIR_MODE = 0o750
UNLISTED = object()  # clean_up's `listed` when not given: remove whatever is there


@dataclass(frozen=True)
class Workspace:
    """A worktree made for one attempt of a repository task."""

    task_id: str
    path: Path        # HOME/work/<task id>
    mirror: Path      # HOME/repos/<name>.git
    source: str       # where the mirror fetches from and the branch is pushed to
    branch: str
    base: str | None  # as the task gave it
    base_sha: str


def work_dir(home: Path) -> Path:
    """HOME/work: the worktrees of running attempts."""
    return home / "work"


def journal_dir(home: Path) -> Path:
    """HOME/run/worktrees: one journal per task that has (or is making) a worktree."""
    return home / "run" / "worktrees"


def _checked_id(task_id: str) -> str:
    # ID_RE alone admits "." and "..", which as a directory name would be work/ or the home.
    if not ID_RE.fullmatch(task_id) or set(task_id) == {"."}:
        raise InvalidTask(f"id: {task_id!r} cannot name a worktree")
    return task_id


def worktree_path(home: Path, task_id: str) -> Path:
    """HOME/work/<task id>."""
    return work_dir(home) / _checked_id(task_id)


def journal_path(home: Path, task_id: str) -> Path:
    """HOME/run/worktrees/<task id>.json."""
    return journal_dir(home) / f"{_checked_id(task_id)}.json"


# --- the journal ---------------------------------------------------------------------------


def _write_journal(home: Path, task_id: str, record: dict[str, Any]) -> None:
    path = journal_path(home, task_id)
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    durable.write_atomic(path, json.dumps(record, sort_keys=True).encode())


def read_journal(home: Path, task_id: str) -> dict[str, Any] | None:
    """What the task's journal records, or None when it has none."""
    try:
        return json.loads(journal_path(home, task_id).read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # torn by hand: the worktree's own .git file still names the mirror
        log.warning("journal of %s is unreadable; cleaning up from the worktree", task_id)
        return None


def _journal_workspace(home: Path, ws: Workspace, **extra: Any) -> None:
    record = {k: os.fspath(v) if isinstance(v, Path) else v for k, v in asdict(ws).items()}
    _write_journal(home, ws.task_id, {**record, "pushed": False, "at": time.time(), **extra})


# --- making a worktree ---------------------------------------------------------------------


def prepare(home: Path, task_id: str, repo: str, settings: RepoSettings, *, base: str | None = None,
            branch: str | None = None, fetch_timeout_s: float = mirrors.FETCH_TIMEOUT_S) -> Workspace:
    """A fresh worktree for an attempt at HOME/work/<id>, on `branch` (koubou/<id>) at `base`.

    RepoRefused (before any git command) when `repo` is not under `repos.allowed`;
    NotARepository or BaseNotFound in git's words; GitError when the fetch fails. The previous
    attempt's worktree, if any, is removed first: every attempt starts from the base.
    """
    location = check_allowed(repo, settings)
    path = worktree_path(home, task_id)
    branch = branch or f"koubou/{task_id}"
    if not git.valid_branch(branch):
        raise InvalidTask(f"branch: {branch!r} is not a valid branch name")
    if not is_url(location):
        git.require_repository(location)
    mirror = mirrors.update_mirror(home, location, timeout_s=fetch_timeout_s)
    base_sha = mirrors.resolve_base(mirror, base)
    clean_up(home, task_id)
    ws = Workspace(task_id, path, mirror, location, branch, base, base_sha)
    try:
        _add_worktree(home, ws, fetch_timeout_s)
    except BaseException:
        clean_up(home, task_id)
        raise
    return ws


def _add_worktree(home: Path, ws: Workspace, fetch_timeout_s: float) -> None:
    ws.path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    with mirrors.mirror_lock(ws.mirror):
        # Journalled under the lock that `koubou maintain` removes under: it sees this attempt's
        # journal, not the one it listed as stale, and leaves it (clean_up's `listed`).
        _journal_workspace(home, ws)
        # --no-track: upstream tracking would write branch.<name>.* into the shared config.
        git.run(*NO_HOOKS, "worktree", "add", "--quiet", "--no-checkout", "--no-track", "-B", ws.branch,
                ws.path, ws.base_sha, git_dir=ws.mirror)
    # The checkout is the slow part (seconds for thousands of files on a cold disk) and writes
    # only this worktree's own index, files and branch, so it runs outside the lock. It is the
    # command `git worktree add` itself runs after making the worktree.
    git.run(*NO_HOOKS, "reset", "--hard", "--quiet", "--no-recurse-submodules", cwd=ws.path)
    if (ws.path / ".gitmodules").exists():
        # Under the lock: `submodule update --init` writes submodule.<name>.url into the
        # mirror's shared config. A local source's submodules are named by local paths (relative
        # URLs resolve against the source), which git 2.38.1+ refuses unless file:// is allowed.
        allow = ["-c", "protocol.file.allow=always"] if not is_url(ws.source) else []
        # As long as a fetch may take: a submodule's server that never answers would otherwise
        # hold the lock, and with it every task on this repository and maintain's prune.
        with mirrors.mirror_lock(ws.mirror):
            git.run(*NO_HOOKS, *allow, "submodule", "update", "--quiet", "--init", "--recursive",
                    cwd=ws.path, timeout=fetch_timeout_s)


def guarded_paths(ws: Workspace) -> list[str]:
    """What a sandboxed agent may read but not change in the mirror it commits to: what git
    takes commands from (the config's filters, fsmonitor and hooksPath; hooks/) and where the
    worktree finds its repository (its .git file; its admin directory's commondir and gitdir).
    koubou's own git commands run outside the sandbox, after the agent: changed, these would
    run the agent's commands there. Read before the agent runs, while koubou's own; hooks/ is
    made if missing, since a path that does not exist cannot be bound and the agent could."""
    os.makedirs(ws.mirror / "hooks", mode=DIR_MODE, exist_ok=True)
    guarded = [ws.mirror / "config", ws.mirror / "hooks", ws.path / ".git"]
    admin = _admin_dir(ws.path)
    if admin is not None:
        guarded += [admin / "commondir", admin / "gitdir", admin / "config.worktree"]
    return [str(path) for path in guarded]


def _admin_dir(path: Path) -> Path | None:
    # A worktree's .git file says `gitdir: <mirror>/worktrees/<name>`.
    try:
        line = (path / ".git").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return Path(line.removeprefix("gitdir: ")) if line.startswith("gitdir: ") else None


# --- after the craftsman -------------------------------------------------------------------


def push_result(home: Path, ws: Workspace, commit: str | None = None, *,
                timeout_s: float = mirrors.FETCH_TIMEOUT_S) -> None:
    """Push the result (`commit`, else the branch) to the source's branch, journalled first as
    published (and as not, once the source refused it: the branch is then the mirror's alone)."""
    _journal_workspace(home, ws, pushed=True)
    try:
        changes.push(ws.mirror, ws.source, ws.branch, commit=commit, timeout_s=timeout_s)
    except changes.PushRefused:
        _journal_workspace(home, ws)
        raise


# --- clean-up ------------------------------------------------------------------------------


def clean_up(home: Path, task_id: str, *, keep_branch: bool = False,
             listed: Any = UNLISTED) -> bool:
    """Remove a task's worktree, its registration and journal, and its branch unless pushed or kept.

    Safe at any moment after a crash, and when there is nothing to remove. Returns whether
    there was something. With `listed`, the journal's `at` when the task was found stale (None:
    it had none), nothing is removed once that changed: a new attempt of the task began since.
    """
    path, journal = worktree_path(home, task_id), read_journal(home, task_id)
    mirror = Path(journal["mirror"]) if journal else _mirror_of(path)
    if journal is None and mirror is None and not os.path.lexists(path):
        return False
    if mirror is not None and mirror.is_dir():
        with mirrors.mirror_lock(mirror):
            journal = read_journal(home, task_id)  # as the last holder of the lock left it
            if listed is not UNLISTED and _journal_at(journal) != listed:
                return False
            _remove_worktree(mirror, path)
            if journal and not keep_branch and not journal.get("pushed"):
                _delete_branch(mirror, journal["branch"])
            journal_path(home, task_id).unlink(missing_ok=True)
    elif listed is not UNLISTED and _journal_at(read_journal(home, task_id)) != listed:
        return False
    elif os.path.lexists(path):
        _remove_tree(path)
    journal_path(home, task_id).unlink(missing_ok=True)
    log.debug("worktree of %s cleaned up", task_id)
    return True


def _mirror_of(path: Path) -> Path | None:
    admin = _admin_dir(path)
    return None if admin is None else admin.parent.parent


def _remove_worktree(mirror: Path, path: Path) -> None:
    if os.path.lexists(path):
        try:
            git.run("worktree", "remove", "--force", path, git_dir=mirror)
        except GitError as exc:  # not registered (the add never ran), or half-made
            log.debug("%s", exc)
        _remove_tree(path)
    git.run("worktree", "prune", git_dir=mirror)


def _remove_tree(path: Path) -> None:
    """Remove a worktree's directory whatever modes its craftsman left in it. A directory it
    made read-only keeps its entries from rmtree (as any user but root), and the next
    attempt's `git worktree add` would then fail on the path, every attempt alike. Each
    directory is made its owner's to write before it is entered; links are never followed."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path) or os.path.islink(path):
        return
    _owner_writable(str(path))
    for root, directories, _ in os.walk(path):
        for name in directories:
            if not os.path.islink(full := os.path.join(root, name)):
                _owner_writable(full)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        log.warning("could not remove %s (%s): the next attempt of its task cannot make its "
                    "worktree there until it is gone", path, exc)


def _owner_writable(directory: str) -> None:
    try:
        os.chmod(directory, stat.S_IMODE(os.lstat(directory).st_mode) | stat.S_IRWXU)
    except OSError:
        pass  # not ours to change: the rmtree that follows says so


def _delete_branch(mirror: Path, branch: str) -> None:
    # Never a branch another worktree has checked out (two tasks may name one `branch`).
    if any(wt.branch == f"refs/heads/{branch}" for wt in git.worktrees(mirror)):
        return
    git.delete_branch(mirror, branch)


def _journal_at(journal: dict[str, Any] | None) -> Any:
    """When the journal was last written: a new attempt's journal (or a push) changes it."""
    return None if journal is None else journal.get("at")


def _task_ids(home: Path) -> dict[str, float]:
    """Every task id with a journal or a worktree directory, with the time it was last touched."""
    found: dict[str, float] = {}
    for directory, suffix in ((journal_dir(home), ".json"), (work_dir(home), "")):
        if not directory.is_dir():
            continue
        for entry in os.scandir(directory):
            name = entry.name.removesuffix(suffix) if suffix and entry.name.endswith(suffix) else entry.name
            if (suffix and not entry.name.endswith(suffix)) or not ID_RE.fullmatch(name):
                continue  # a journal's tmp file, or nothing of ours
            found[name] = max(found.get(name, 0.0), entry.stat(follow_symlinks=False).st_mtime)
    return found


def live_worktrees(home: Path) -> int:
    """How many worktrees the home holds or is making (for `repos.max_worktrees`)."""
    return len(_task_ids(home))


def stale_worktrees(home: Path, live_ids: Collection[str], *, min_age_s: float = 0.0) -> list[str]:
    """Ids whose worktree or journal no live claim owns, untouched for at least `min_age_s`.

    Read `live_ids` after the claim that makes a worktree, or pass a `min_age_s` longer than
    claiming takes: a worktree made after `live_ids` was read would otherwise look stale.
    """
    cutoff = time.time() - min_age_s
    return sorted(i for i, at in _task_ids(home).items() if i not in live_ids and at <= cutoff)


def prune(home: Path, live_ids: Collection[str] | Callable[[], Collection[str]], *,
          min_age_s: float = 0.0) -> list[str]:
    """For `koubou maintain`: clean up every stale worktree, then prune every mirror. Returns the ids.

    `live_ids` may be a function, called after the worktrees are listed: a claim is made before
    its worktree, so every worktree listed then belongs to a claim it returns, or to none.
    """
    if callable(live_ids):
        listed = stale_worktrees(home, (), min_age_s=min_age_s)
        journalled = {task_id: _journal_at(read_journal(home, task_id)) for task_id in listed}
        live = set(live_ids())
        stale = [task_id for task_id in listed if task_id not in live]
    else:
        stale = stale_worktrees(home, live_ids, min_age_s=min_age_s)
        journalled = {task_id: _journal_at(read_journal(home, task_id)) for task_id in stale}
    # A task claimed after its claims were read has a new attempt making its worktree, with a
    # journal of its own: that one is left to it (prepare journals under the mirror's lock).
    stale = [task_id for task_id in stale if clean_up(home, task_id, listed=journalled[task_id])]
    root = mirrors.repos_dir(home)
    for lock in sorted(root.glob("*.lock")) if root.is_dir() else []:
        mirror = lock.with_suffix(".git")
        with mirrors.mirror_lock(mirror):
            mirrors.remove_leftovers(mirror)
            if mirror.is_dir():
                git.run("worktree", "prune", git_dir=mirror)
    return stale
