"""An LLM craftsman's answer as a change: the unified diff in it, checked, then `git apply --3way`.

Every path the diff names is judged before git sees it: absolute paths, `..`, `.git` and paths
that resolve (through a symlink already in the worktree) to somewhere outside it are refused, as
is a diff that would create a symlink (it could point outside, and a later hunk write through it).
`git apply` has checks of its own; these do not rely on them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import KoubouError
from . import git
from .git import GitError, StrPath

_FENCE_RE = re.compile(r"^(?P<fence>`{3,}|~{3,})[^\n]*\n(?P<body>.*?)^(?P=fence)[ \t]*$", re.M | re.S)
_HEADER_RE = re.compile(r"^(diff --git |--- \S|\+\+\+ \S)", re.M)
_START_RE = re.compile(r"^(diff --git |--- \S)", re.M)
_NAME_LINE_RE = re.compile(r"^(?P<key>---|\+\+\+|rename from|rename to|copy from|copy to) (?P<name>.+)$")
_HUNK_RE = re.compile(r"^@@ -(?P<old>\d+)(?:,\d+)? \+(?P<new>\d+)(?:,\d+)? @@(?P<rest>.*)$")
_SYMLINK_RE = re.compile(r"^(new file mode|new mode|index [0-9a-f]+\.\.[0-9a-f]+) 120000\b", re.M)
_C_ESCAPES = {"a": "\a", "b": "\b", "t": "\t", "n": "\n", "v": "\v", "f": "\f", "r": "\r",
              '"': '"', "\\": "\\"}


class DiffRefused(KoubouError, ValueError):
    """An answer holds no diff, or its diff reaches outside the worktree."""


class DiffNotApplied(GitError):
    """`git apply` refused the diff; the message is git's."""


def extract_diff(answer: str) -> str:
    """The unified diff in a model's answer: its fenced diff blocks, else the answer from the first header."""
    fenced = [m["body"] for m in _FENCE_RE.finditer(answer) if _HEADER_RE.search(m["body"])]
    if fenced:
        text = "\n".join(block.rstrip("\n") for block in fenced)
    else:
        start = _START_RE.search(answer)
        if start is None or not _HEADER_RE.search(answer, start.start()):
            raise DiffRefused("the answer holds no unified diff (expected `diff --git` or ---/+++ headers)")
        text = answer[start.start():]
    return text.rstrip("\n") + "\n"


def _hunk_ends(lines: list[str], i: int) -> bool:
    line = lines[i]
    if line.startswith(("@@ ", "diff ")) or (line[:1] not in ("", " ", "+", "-", "\\")):
        return True
    return line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")


def recount(diff: str) -> str:
    """The diff with each hunk header's line counts taken from its body.

    Models rarely count right, and `git apply --recount` cannot help when files are not
    separated by `diff --git` lines: it reads the next file's `--- a/...` header as a removed
    line. Here a hunk ends at `@@`, `diff `, a ---/+++ pair or prose; blank lines at its end
    (before an explanation, say) are dropped, not taken for context.
    """
    lines, out, i = diff.split("\n"), [], 0
    while i < len(lines):
        header = _HUNK_RE.match(lines[i])
        if not header:
            out.append(lines[i])
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not _hunk_ends(lines, end):
            end += 1
        body = lines[i + 1:end]
        while body and body[-1] == "":
            body.pop()
        old = sum(1 for line in body if line[:1] in ("", " ", "-"))
        new = sum(1 for line in body if line[:1] in ("", " ", "+"))
        out += [f"@@ -{header['old']},{old} +{header['new']},{new} @@{header['rest']}", *body]
        i = end
    return "\n".join(out).rstrip("\n") + "\n"


def _unquote(name: str) -> str:
    # git C-quotes names with unusual characters: "a/sp\303\251cial"
    if not (len(name) >= 2 and name[0] == name[-1] == '"'):
        return name
    raw, i, body = bytearray(), 0, name[1:-1]
    while i < len(body):
        if body[i] == "\\" and body[i + 1:i + 2] in _C_ESCAPES:
            raw += _C_ESCAPES[body[i + 1]].encode()
            i += 2
        elif body[i] == "\\" and re.match(r"[0-7]{3}", body[i + 1:i + 4]):
            raw.append(int(body[i + 1:i + 4], 8))
            i += 4
        else:
            raw += body[i].encode()
            i += 1
    return os.fsdecode(bytes(raw))


def _git_header_names(rest: str) -> list[str]:
    """Every reading of `diff --git a/X b/Y` (unquoted names may hold spaces: judge them all)."""
    if rest.startswith('"'):
        names = re.findall(r'"(?:[^"\\]|\\.)*"|\S+', rest)
        return [_unquote(n) for n in names]
    names = []
    for match in re.finditer(" ", rest):
        names += [rest[:match.start()], rest[match.end():]]
    return names or [rest]


def header_names(diff: str) -> list[tuple[str, str]]:
    """(name, kind) for each file name in the diff's headers, as written.

    kind is `prefixed` for ---/+++ names (a/ b/ prefixes, stripped by -p1), `bare` for
    rename/copy names (never prefixed) and `candidate` for each reading of a `diff --git` line.
    """
    names = []
    for line in diff.splitlines():
        if line.startswith("diff --git "):
            names += [(n, "candidate") for n in _git_header_names(line[len("diff --git "):])]
            continue
        match = _NAME_LINE_RE.match(line)
        if match:
            name = match["name"]
            name = _unquote(name) if name.startswith('"') else name.split("\t")[0].strip()  # no diff(1) date
            names.append((name, "prefixed" if match["key"] in ("---", "+++") else "bare"))
    return [(n, kind) for n, kind in names if n != "/dev/null"]


def _strip_level(names: list[tuple[str, str]]) -> int:
    """1 when the names carry git's a/ and b/ prefixes (the usual case), else 0."""
    prefixed = [n for n, kind in names if kind == "prefixed"]
    prefixed = prefixed or [n for n, kind in names[:1] if kind == "candidate"]
    return 1 if prefixed and all(n.startswith(("a/", "b/")) for n in prefixed) else 0


def _judge(root: Path, name: str) -> None:
    if not name or os.path.isabs(name):
        raise DiffRefused(f"the diff names an absolute path: {name!r}")
    parts = Path(name).parts
    if ".." in parts:
        raise DiffRefused(f"the diff names a path outside the worktree: {name!r}")
    if any(part.lower() == ".git" for part in parts):
        raise DiffRefused(f"the diff names a path inside .git: {name!r}")
    real = os.path.realpath(root / name)
    if real != str(root) and not real.startswith(str(root) + os.sep):
        raise DiffRefused(f"the diff names {name!r}, which leads outside the worktree (through a symlink)")
    if os.path.islink(root / name):  # git apply keeps a link a link: the patch would retarget it
        raise DiffRefused(f"the diff changes {name!r}, a symbolic link; koubou applies no symlinks "
                          "from a model")


def _in_worktree(name: str, kind: str, level: int) -> str:
    if os.path.isabs(name):
        raise DiffRefused(f"the diff names an absolute path: {name!r}")
    if kind == "bare" or level == 0 or (kind == "candidate" and not name.startswith(("a/", "b/"))):
        return name
    return name.split("/", 1)[-1]


def diff_paths(worktree: StrPath, diff: str) -> tuple[list[str], int]:
    """The worktree paths a diff touches and its strip level; DiffRefused for any unsafe one."""
    if _SYMLINK_RE.search(diff):
        raise DiffRefused("the diff creates a symbolic link; koubou applies no symlinks from a model")
    names = header_names(diff)
    if not names:
        raise DiffRefused("the diff names no file")
    level = _strip_level(names)
    root = Path(os.path.realpath(worktree))
    paths = set()
    for name, kind in names:
        path = _in_worktree(name, kind, level)
        _judge(root, path)
        if kind != "candidate":
            paths.add(path)
    return sorted(paths), level


def apply_diff(worktree: StrPath, answer: str) -> list[str]:
    """Apply the diff in a model's answer to the worktree; returns the paths it names.

    DiffRefused when there is no diff or a path reaches outside; DiffNotApplied with git's
    message when git cannot apply it.
    """
    diff = recount(extract_diff(answer))
    paths, level = diff_paths(worktree, diff)
    try:
        git.run("apply", "--3way", "--whitespace=nowarn", f"-p{level}", "-",
                cwd=worktree, input=diff.encode("utf-8", "surrogateescape"))
    except GitError as exc:
        raise DiffNotApplied.reworded(exc, "the diff does not apply") from None
    return paths
