"""What an LLM craftsman is shown of a repository: its file list and the files the task names."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import git
from .git import StrPath
from .policy import is_url

LIST_SHARE = 4  # the file list may take a quarter of the budget; the named files get the rest
SCAN_BYTES = 1 << 20  # of each named file, scanned for sensitive content when routing
SCAN_TIMEOUT_S = 30
TRUNCATED = "\n[... truncated]"


@dataclass(frozen=True)
class RepoContext:
    """The file list, the named files' text (to scan for sensitive content), and the prompt text."""

    file_list: list[str]
    files: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # named files not shown, and why
    text: str = ""


def _named_file(root: Path, name: str, budget: int) -> tuple[str | None, str | None]:
    """(text, None) or (None, why not) for one named file, at most `budget` bytes of it."""
    if budget <= 0:
        return None, "over the size limit"
    real = os.path.realpath(root / name)
    if os.path.isabs(name) or ".." in Path(name).parts or not real.startswith(str(root) + os.sep):
        return None, "outside the repository"
    if not os.path.isfile(real):
        return None, "not in the repository"
    with open(real, "rb") as handle:
        data = handle.read(budget + 1)
    if b"\0" in data[:8192]:
        return None, "binary"
    text = data[:budget].decode("utf-8", errors="replace")
    return (text + TRUNCATED if len(data) > budget else text), None


def _listing(names: list[str], budget: int) -> str:
    lines, used = [], 0
    for count, name in enumerate(names):
        if used + len(name) + 1 > budget:
            lines.append(f"[... and {len(names) - count} more]")
            break
        lines.append(name)
        used += len(name) + 1
    return "\n".join(lines)


def repo_context(worktree: StrPath, files: Sequence[str], max_bytes: int) -> RepoContext:
    """The repository's tracked files and the named `files` (relative paths), within `max_bytes`."""
    root = Path(os.path.realpath(worktree))
    names = git.ls_files(root)
    parts = [f"Files in the repository ({len(names)}):\n" + _listing(names, max_bytes // LIST_SHARE)]
    budget = max_bytes - len(parts[0].encode()) - 3  # the separators and the final newline
    shown, notes = {}, {}
    for name in files:
        frame = f"=== {name} ===\n\n=== end of {name} ===\n\n"
        text, why = _named_file(root, name, budget - len(frame.encode()) - len(TRUNCATED))
        if text is None:
            notes[name] = why
            parts.append(f"=== {name}: not shown ({why}) ===")
            budget -= len(parts[-1]) + 2
            continue
        shown[name] = text
        budget -= len(frame.encode()) + len(text.encode())
        parts.append(f"=== {name} ===\n{text}\n=== end of {name} ===")
    return RepoContext(file_list=names, files=shown, notes=notes, text="\n\n".join(parts) + "\n")


def files_at_base(location: str, base: str | None, files: Sequence[str],
                  max_bytes: int = SCAN_BYTES) -> list[str]:
    """The text of the named files as the task's base has them (the source's HEAD when it
    names none), in a local source repository, each cut at max_bytes: what routing scans for
    sensitive content, before any worktree exists. A name the base lacks is left out, and so
    is a URL's every file: nothing is fetched to route."""
    if not files or is_url(location):
        return []
    asked = "".join(f"{base or 'HEAD'}:{name}\n" for name in files if "\n" not in name)
    try:
        done = git.run("cat-file", "--batch", cwd=location, input=asked.encode(), check=False,
                       timeout=SCAN_TIMEOUT_S)
    except (OSError, git.GitError):  # no such directory, or hung: the worker says why later
        return []
    texts, out = [], done.stdout
    while out:
        header, _, out = out.partition(b"\n")
        fields = header.split()
        if len(fields) != 3 or not fields[2].isdigit():
            continue  # "<name> missing", or ambiguous: nothing of it follows
        size = int(fields[2])
        if fields[1] == b"blob":
            texts.append(out[:min(size, max_bytes)].decode("utf-8", errors="replace"))
        out = out[size + 1:]
    return texts
