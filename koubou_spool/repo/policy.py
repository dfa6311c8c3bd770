"""Which repositories a task may name (`repos:` of PRODUCT.md §6), judged before any git command runs.

A local path is judged by where it really is: expanded, resolved through every symlink, and matched
on whole path components, so `~/src` allows `~/src/app` but not `~/src-old`, and a symlink under
`~/src` that points elsewhere is judged by where it points. A URL is matched as a string prefix that
ends at a separator (`/` or `:`), with `.git` at the end ignored.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, KoubouError

log = logging.getLogger(__name__)

DEFAULT_AUTHOR = "koubou <koubou@localhost>"
AUTHOR_RE = re.compile(r"[^<>\n]+ <[^<>\s]+>")
_SCHEME_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_SCP_RE = re.compile(r"[^/:]+:")  # git's scp-like syntax: host:path, a colon before any slash
_SCHEMES = frozenset({"https", "http", "ssh", "git", "git+ssh", "ssh+git"})


class RepoRefused(KoubouError, PermissionError):
    """The repository is not under `repos.allowed`, or names a transport koubou does not use."""


@dataclass(frozen=True)
class RepoSettings:
    """The `repos:` section of the config."""

    allowed: tuple[str, ...] = ()
    confidential: tuple[str, ...] = ()
    verify_timeout_s: float = 900.0
    push: bool = True
    max_worktrees: int | None = None
    author: str = DEFAULT_AUTHOR

    @classmethod
    def parse(cls, mapping: Mapping[str, Any] | None) -> RepoSettings:
        """Settings from the config's `repos:` mapping; ConfigError naming the key that is wrong."""
        mapping = {} if mapping is None else mapping
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"repos: expected a mapping, got {type(mapping).__name__}")
        for key in sorted(set(mapping) - set(cls.__dataclass_fields__)):
            log.warning("repos.%s: unknown key, ignored", key)
        return cls(allowed=_locations(mapping, "allowed"), confidential=_locations(mapping, "confidential"),
                   verify_timeout_s=_number(mapping, "verify_timeout_s", cls.verify_timeout_s),
                   push=_flag(mapping, "push", cls.push),
                   max_worktrees=_count(mapping, "max_worktrees"), author=_author(mapping))


def _locations(mapping: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = mapping.get(key, [])
    value = [value] if isinstance(value, str) else value  # one location where a list is asked
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise ConfigError(f"repos.{key}: expected a list of paths and URL prefixes, got {value!r}")
    for index, item in enumerate(value):
        if not is_url(item) and not os.path.isabs(os.path.expanduser(item)):
            raise ConfigError(f"repos.{key}[{index}]: expected an absolute path, a ~/ path or a URL "
                              f"prefix, got {item!r}")
    return tuple(value)


def _number(mapping: Mapping[str, Any], key: str, default: float) -> float:
    value = mapping.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"repos.{key}: expected a positive number of seconds, got {value!r}")
    return float(value)


def _flag(mapping: Mapping[str, Any], key: str, default: bool) -> bool:
    value = mapping.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"repos.{key}: expected true or false, got {value!r}")
    return value


def _count(mapping: Mapping[str, Any], key: str) -> int | None:
    value = mapping.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"repos.{key}: expected a whole number of at least 1, got {value!r}")
    return value


def _author(mapping: Mapping[str, Any]) -> str:
    value = mapping.get("author", DEFAULT_AUTHOR)
    if not isinstance(value, str) or not AUTHOR_RE.fullmatch(value):
        raise ConfigError(f"repos.author: expected 'Name <email>', got {value!r}")
    return value


# --- locations -----------------------------------------------------------------------------


def is_url(location: str) -> bool:
    """Whether git would take `location` for a URL (scheme://... or scp-like host:path)."""
    return bool(_SCHEME_RE.match(location) or _SCP_RE.match(location))


def source_location(repo: str) -> str:
    """Where koubou fetches a task's `repo` from: a resolved absolute path, or the URL itself.

    RepoRefused for what must never reach git: an option-like name, a relative path, a remote
    helper (`ext::`), a URL with a `..` segment or a scheme koubou does not fetch over.
    """
    if not isinstance(repo, str) or not repo or repo.startswith("-") or "\n" in repo or "\0" in repo:
        raise RepoRefused(f"repo {repo!r} is not a repository path or URL")
    scheme = _SCHEME_RE.match(repo)
    if scheme and scheme["scheme"].lower() == "file":
        repo = urllib.parse.unquote(urllib.parse.urlsplit(repo).path)
    elif scheme or _SCP_RE.match(repo):
        if "::" in repo or (scheme and scheme["scheme"].lower() not in _SCHEMES):
            raise RepoRefused(f"repo {repo!r}: koubou fetches over https, ssh and git only")
        if ".." in re.split(r"[/:]", repo):
            raise RepoRefused(f"repo {repo!r}: a URL with a '..' segment is not allowed")
        return repo.rstrip("/")
    expanded = os.path.expanduser(repo)
    if not os.path.isabs(expanded):
        raise RepoRefused(f"repo {repo!r}: a local repository must be named by an absolute path")
    return os.path.realpath(expanded)


def _covers(entry: str, location: str) -> bool:
    if is_url(entry) and not entry.lower().startswith("file://"):
        if not is_url(location):
            return False
        entry, location = _strip_git(entry), _strip_git(location)
        return location == entry or location.startswith(entry if entry[-1] in "/:" else entry + "/")
    if is_url(location):
        return False
    root = source_location(entry)
    return location == root or location.startswith(root.rstrip(os.sep) + os.sep)


def _strip_git(url: str) -> str:
    url = url.rstrip("/")
    return url[:-4] if url.endswith(".git") else url


def matches(repo: str, entries: tuple[str, ...]) -> bool:
    """Whether `repo` lies under one of the paths or URL prefixes."""
    try:
        location = source_location(repo)
    except RepoRefused:
        return False
    return any(_covers(entry, location) for entry in entries)


def allowed(repo: str, settings: RepoSettings) -> bool:
    """Whether a task may name `repo` (`repos.allowed`; nothing is allowed by default)."""
    return matches(repo, settings.allowed)


def confidential(repo: str, settings: RepoSettings) -> bool:
    """Whether tasks on `repo` may only go to local craftsmen (`repos.confidential`)."""
    return matches(repo, settings.confidential)


def check_allowed(repo: str, settings: RepoSettings) -> str:
    """The source location of an allowed `repo`; RepoRefused naming the setting otherwise."""
    location = source_location(repo)
    if not any(_covers(entry, location) for entry in settings.allowed):
        raise RepoRefused(f"repo {repo!r} is not under repos.allowed; add it (or a directory or URL "
                          "prefix above it) to the config")
    return location
