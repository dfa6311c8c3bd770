"""Every question koubou asks of git, and the one place git is run (after pre-commit's git.py).

Git is always an argv list, never a shell. The environment it gets has none of the inherited
variables that would point it at another repository or index (a worker started from a git hook, or
a test run inside `git rebase -x`, has GIT_DIR set), a fixed locale so its messages read the same
everywhere, and no terminal to prompt on: a fetch that wants a password fails instead of hanging.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import KoubouError
from ..spool.permissions import CHILD_UMASK

log = logging.getLogger(__name__)

StrPath = str | os.PathLike
STDERR_TAIL = 2000  # characters of git's stderr an error keeps

# Inherited GIT_* variables that say how to reach a remote, not which repository to work on.
_KEPT = frozenset({"GIT_EXEC_PATH", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_SSL_CAINFO", "GIT_SSL_NO_VERIFY",
                   "GIT_HTTP_PROXY_AUTHMETHOD", "GIT_ALLOW_PROTOCOL", "GIT_ASKPASS",
                   "GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM", "GIT_CONFIG_NOSYSTEM"})


class GitError(KoubouError, RuntimeError):
    """A git command failed: `argv`, `returncode` (None when it timed out) and git's own words."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str, summary: str = "") -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr[-STDERR_TAIL:].strip()
        status = "timed out" if returncode is None else f"exit {returncode}"
        head = summary or f"{' '.join(self.argv)} failed ({status})"
        super().__init__(f"{head}: {self.stderr}" if self.stderr else head)

    @classmethod
    def reworded(cls, exc: GitError, summary: str) -> GitError:
        """This kind of error for the command `exc` is about, with git's words after `summary`."""
        return cls(exc.argv, exc.returncode, exc.stderr, summary)


class NotARepository(GitError):
    """The path a task names is not the top of a git repository."""


def strip_git_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` without the GIT_* variables that say which repository, index or tree to use."""
    return {k: v for k, v in environ.items()
            if not k.startswith("GIT_") or k in _KEPT or k == "GIT_CONFIG_COUNT"
            or k.startswith(("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_"))}


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment git runs in: stripped, in the C locale, never prompting; plus `extra`."""
    env = strip_git_env(os.environ)
    env.pop("LANGUAGE", None)
    env.update({"LC_ALL": "C", "LANG": "C", "GIT_TERMINAL_PROMPT": "0"})
    env.update(extra or {})
    return env


def run(*args: StrPath, cwd: StrPath | None = None, git_dir: StrPath | None = None,
        input: bytes | None = None, env: Mapping[str, str] | None = None, check: bool = True,
        timeout: float | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `git ARGS` (with --git-dir when given); GitError when it fails and `check` is on."""
    argv = ["git", *([f"--git-dir={git_dir}"] if git_dir is not None else []), *map(os.fspath, args)]
    # A session of its own: no controlling terminal for ssh to prompt on, and a timeout can
    # take down git's helpers (ssh, upload-pack) with it.
    proc = subprocess.Popen(argv, cwd=cwd, env=clean_env(env), start_new_session=True,
                            umask=CHILD_UMASK,  # a mirror, a worktree: never others' to read
                            stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise GitError(argv, None, "", f"{' '.join(argv)} timed out after {timeout} s") from None
    result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise GitError(argv, proc.returncode, err.decode(errors="replace"))
    if err:
        log.debug("%s: %s", " ".join(argv), err.decode(errors="replace").strip())
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def text(*args: StrPath, **kwargs) -> str:
    """git's stdout as text without the final newline."""
    return run(*args, **kwargs).stdout.decode(errors="surrogateescape").rstrip("\n")


def split_z(data: bytes) -> list[str]:
    """The fields of a `-z` output, as file-system strings."""
    return [os.fsdecode(field) for field in data.split(b"\0")[:-1]] if data else []


# --- repositories --------------------------------------------------------------------------


def _at_top(path: Path) -> dict[str, str]:
    # Look for a repository at `path` itself, never in a directory above it.
    return {"GIT_CEILING_DIRECTORIES": os.fspath(path.parent)}


def is_repository(path: StrPath) -> bool:
    """Whether `path` is a repository (a work tree's top, or a bare repository)."""
    path = Path(path)
    return path.is_dir() and run("rev-parse", "--git-dir", cwd=path, env=_at_top(path),
                                 check=False).returncode == 0


def require_repository(path: StrPath) -> None:
    """NotARepository, in git's words, unless `path` is a repository."""
    path = Path(path)
    if not path.is_dir():
        raise NotARepository(["git", "rev-parse", "--git-dir"], 128, f"fatal: cannot change to '{path}': "
                             "No such file or directory", f"{path} is not a git repository")
    try:
        run("rev-parse", "--git-dir", cwd=path, env=_at_top(path))
    except GitError as exc:
        raise NotARepository.reworded(exc, f"{path} is not a git repository") from None


def commit_of(git_dir: StrPath, rev: str) -> str | None:
    """The commit `rev` names in the repository, or None."""
    result = run("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}",
                 git_dir=git_dir, check=False)
    return result.stdout.decode().strip() if result.returncode == 0 else None


def verify_commit(git_dir: StrPath, rev: str) -> str:
    """The commit `rev` names; GitError in git's words when it names none."""
    return text("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}", git_dir=git_dir)


def head(worktree: StrPath) -> str:
    """The commit checked out in a worktree."""
    return text("rev-parse", "--verify", "HEAD^{commit}", cwd=worktree)


def remote_url(git_dir: StrPath, remote: str = "origin") -> str:
    """Where a remote fetches from."""
    return text("config", "--get", f"remote.{remote}.url", git_dir=git_dir)


def set_config(git_dir: StrPath, key: str, value: str, *, add: bool = False) -> None:
    """Set (or with `add`, append) one config value of a repository."""
    run("config", *(["--add"] if add else []), key, value, git_dir=git_dir)


# --- files and changes ---------------------------------------------------------------------


def ls_files(worktree: StrPath) -> list[str]:
    """The tracked files of a worktree."""
    return split_z(run("ls-files", "-z", cwd=worktree).stdout)


def stage_all(worktree: StrPath) -> None:
    """Stage every change, new files included (ignored files stay out)."""
    run("add", "-A", cwd=worktree)


def has_staged(worktree: StrPath) -> bool:
    """Whether the index differs from HEAD."""
    result = run("diff", "--cached", "--quiet", "--no-ext-diff", cwd=worktree, check=False)
    if result.returncode not in (0, 1):
        raise GitError(result.args, result.returncode, result.stderr.decode(errors="replace"))
    return result.returncode == 1


def _diff_args(base: str, tip: str) -> list[str]:
    return ["--no-ext-diff", "--no-textconv", "--no-color", base, tip, "--"]


def numstat(worktree: StrPath, base: str, tip: str = "HEAD") -> list[tuple[int | None, int | None, str]]:
    """(insertions, deletions, path) per changed file; None counts for binary files."""
    fields = split_z(run("diff", "--numstat", "-z", *_diff_args(base, tip), cwd=worktree).stdout)
    stats, i = [], 0
    while i < len(fields):
        added, deleted, path = fields[i].split("\t", 2)
        if path == "":  # a rename or copy: the old and the new path follow as fields of their own
            path, i = fields[i + 2], i + 2
        stats.append((None if added == "-" else int(added), None if deleted == "-" else int(deleted), path))
        i += 1
    return stats


def patch(worktree: StrPath, base: str, tip: str = "HEAD") -> bytes:
    """The patch from base to tip, binary files included (`git apply` takes it back)."""
    return run("diff", "--binary", "--full-index", *_diff_args(base, tip), cwd=worktree).stdout


# --- worktrees and branches ----------------------------------------------------------------


@dataclass(frozen=True)
class Worktree:
    """One entry of `git worktree list`."""

    path: str
    head: str | None
    branch: str | None  # refs/heads/..., None when detached or bare
    bare: bool = False


def worktrees(git_dir: StrPath) -> list[Worktree]:
    """The worktrees a repository has registered (itself first)."""
    found, attrs = [], {}
    for field in split_z(run("worktree", "list", "--porcelain", "-z", git_dir=git_dir).stdout) + [""]:
        if field:
            key, _, value = field.partition(" ")
            attrs[key] = value
        elif attrs:
            found.append(Worktree(attrs["worktree"], attrs.get("HEAD"), attrs.get("branch"), "bare" in attrs))
            attrs = {}
    return found


def delete_branch(git_dir: StrPath, branch: str) -> None:
    """Delete a local branch if it exists."""
    run("update-ref", "-d", f"refs/heads/{branch}", git_dir=git_dir)


def branch_exists(git_dir: StrPath, branch: str) -> bool:
    """Whether refs/heads/BRANCH exists."""
    return run("show-ref", "--verify", "--quiet", f"refs/heads/{branch}", git_dir=git_dir,
               check=False).returncode == 0


def valid_branch(branch: str) -> bool:
    """Whether `branch` is a valid branch name (`git check-ref-format --branch`)."""
    return not branch.startswith("-") and run("check-ref-format", "--branch", branch,
                                              check=False).returncode == 0
