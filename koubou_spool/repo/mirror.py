"""The bare mirror a home keeps of each source repository (HOME/repos/), and the lock that guards it.

The mirror is a bare repository whose remote `origin` is the source. The source's branches land in
refs/remotes/origin/ and its HEAD in refs/koubou/source-head, never in refs/heads/: refs/heads/
holds only the branches koubou's worktrees are on, so a fetch can neither overwrite nor prune a
branch a worktree has checked out (a true `--mirror` fetch would try to).

Git takes its own locks with O_EXCL files (config.lock, packed-refs.lock) and gives up at once
when one is held, which is what makes parallel `git worktree add` fail with `could not lock config
file`. Every write to a mirror therefore happens under one flock on `<mirror name>.lock` beside it:
waiters queue instead of failing, and the kernel drops the lock when its holder dies, so a
kill -9 never leaves it held.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from . import git
from .git import GitError, StrPath

log = logging.getLogger(__name__)

SOURCE_HEAD = "refs/koubou/source-head"
FETCH_REFSPECS = ("+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*",
                  f"+HEAD:{SOURCE_HEAD}")
FETCHED_MARK = "koubou-fetched"  # its mtime: when the last successful fetch started
FETCH_TIMEOUT_S = 600.0


class BaseNotFound(GitError):
    """A task's `base` names no commit of its repository."""


def repos_dir(home: Path) -> Path:
    """HOME/repos: the mirrors and their lock files."""
    return home / "repos"


def mirror_path(home: Path, location: str) -> Path:
    """HOME/repos/<name>-<hash>.git for a source location (a resolved path or a URL)."""
    stem = re.sub(r"\.git$", "", re.split(r"[/:]", location.rstrip("/"))[-1]) or "repo"
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", stem).lstrip(".-")[:40] or "repo"
    digest = hashlib.sha256(location.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return repos_dir(home) / f"{stem}-{digest}.git"


def lock_path(mirror: Path) -> Path:
    """The lock file beside a mirror."""
    return mirror.with_suffix(".lock")


@contextlib.contextmanager
def mirror_lock(mirror: Path) -> Iterator[None]:
    """Hold the mirror's lock: every git write to one mirror happens inside it.

    flock locks belong to an open file description, so two threads of one process exclude each
    other as two processes do; the lock is not re-entrant (do not nest it for one mirror).
    """
    mirror.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd = os.open(lock_path(mirror), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def update_mirror(home: Path, location: str, *, timeout_s: float = FETCH_TIMEOUT_S) -> Path:
    """The mirror of `location`, made if missing, and fetched since this call began. Returns its path.

    A fetch that started after this call began (another attempt's, while this one waited for
    the lock) already holds everything this one would fetch, so it is not repeated.
    """
    asked_at = time.time()
    mirror = mirror_path(home, location)
    with mirror_lock(mirror):
        if not mirror.is_dir():
            _create(mirror, location, timeout_s)
        elif _fetched_at(mirror) < asked_at:
            _fetch(mirror, timeout_s)
    return mirror


def _create(mirror: Path, location: str, timeout_s: float) -> None:
    # Made aside and renamed into place: a half-made mirror is never taken for one.
    tmp = mirror.with_name(f"{mirror.name}+{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        git.run("init", "--quiet", "--bare", tmp)
        for key, value in (("remote.origin.url", location), ("gc.auto", "0"), ("maintenance.auto", "false")):
            git.set_config(tmp, key, value)
        for refspec in FETCH_REFSPECS:
            git.set_config(tmp, "remote.origin.fetch", refspec, add=True)
        _fetch(tmp, timeout_s)
        os.rename(tmp, mirror)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("mirror of %s made at %s", location, mirror)


def _fetch(mirror: Path, timeout_s: float) -> None:
    started = time.time()
    git.run("fetch", "--quiet", "--prune", "--no-auto-maintenance", "origin", git_dir=mirror,
            timeout=timeout_s)
    mark = mirror / FETCHED_MARK
    mark.touch(mode=0o640)  # never others' (§2), whatever the umask
    os.utime(mark, (started, started))


def _fetched_at(mirror: Path) -> float:
    try:
        return (mirror / FETCHED_MARK).stat().st_mtime
    except FileNotFoundError:
        return 0.0


def resolve_base(mirror: StrPath, base: str | None) -> str:
    """The commit a task's `base` names in the source, as the mirror last fetched it.

    `base` is read as the source would read it: HEAD (the default) is the source's HEAD, a branch
    name is the source's branch; tags, commit ids and expressions such as `main~2` work too.
    BaseNotFound in git's words when it names no commit.
    """
    base = "HEAD" if base is None else base
    if base == "HEAD" or base.startswith(("HEAD~", "HEAD^")):
        candidates = [SOURCE_HEAD + base[4:]]
    else:
        candidates = [f"refs/remotes/origin/{base}", f"refs/tags/{base}", base]
    for candidate in candidates[:-1]:
        sha = git.commit_of(mirror, candidate)
        if sha:
            return sha
    try:
        return git.verify_commit(mirror, candidates[-1])
    except GitError as exc:
        source = git.remote_url(mirror)
        raise BaseNotFound.reworded(exc, f"base {base!r} names no commit of {source}") from None


def mirrors(home: Path) -> list[Path]:
    """The mirrors of a home."""
    root = repos_dir(home)
    return sorted(p for p in root.glob("*.git") if p.is_dir()) if root.is_dir() else []


def mirrors_size(home: Path) -> dict[str, int]:
    """Bytes on disk of each mirror (worktrees' submodule clones included), by mirror name."""
    return {mirror.name: _disk_usage(mirror) for mirror in mirrors(home)}


def _disk_usage(root: Path) -> int:
    seen, total = set(), 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def remove_leftovers(mirror: Path) -> None:
    """Under the mirror's lock: remove what a creator killed mid-way left (`<name>.git+<pid>`)."""
    for leftover in mirror.parent.glob(f"{glob.escape(mirror.name)}+*"):
        shutil.rmtree(leftover, ignore_errors=True)

