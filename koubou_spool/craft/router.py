"""Which craftsman a task goes to (README: Configuration; How it keeps its promises). Pure: no I/O.

Order of reasoning: is anything in the task confidential (declared, or a sensitive pattern
anywhere in what would be sent)? How hard is it (declared, or keywords)? Then an explicit
`craftsman` is honoured, else the first matching rule. Whatever was chosen, confidential
content goes only to a `local: true` craftsman, and a cloud craftsman is only chosen while the
budget has room (or `when_exhausted` says what to do instead).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..spool.task import Task

DEFAULT_SENSITIVE_PATTERNS = [
    r"(?i)password\s*[:=]", r"(?i)api[_-]?key\s*[:=]", r"(?i)secret\s*[:=]",
    r"(?i)token\s*[:=]", r"(?i)private[_-]?key", r"-----BEGIN [A-Z ]*PRIVATE KEY-----"]
DEFAULT_DIFFICULTY_KEYWORDS = {
    "high": ["architecture", "distributed", "algorithm", "concurrent", "optimization"],
    "medium": ["refactor", "implement", "api", "database", "integration"],
    "low": ["fix", "rename", "format", "comment"]}
LEVELS = ("high", "medium", "low")


@dataclass(frozen=True)
class Pattern:
    """A sensitive pattern: shown by its name (or index), never by what it matched."""

    label: str
    regex: re.Pattern


@dataclass(frozen=True)
class Route:
    """A routing decision and its reasons. `craftsman` None: `kind` says what happens instead."""

    craftsman: str | None
    reason: str
    kind: str = ""  # when craftsman is None: invalid, policy, budget or defer
    confidential: bool = False
    pattern: str | None = None
    difficulty: str = "low"
    keywords: tuple[str, ...] = ()
    rule: int | None = None
    notes: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def _compile(spec: str) -> tuple[Pattern, ...]:
    patterns = []
    for index, item in enumerate(json.loads(spec)):
        name, source = (item.get("name"), item.get("pattern")) if isinstance(item, dict) \
            else (None, item)
        try:
            patterns.append(Pattern(name or f"#{index + 1}", re.compile(source)))
        except (re.error, TypeError) as exc:
            raise ConfigError(f"routing.sensitive_patterns[{index}] is not a regular "
                              f"expression: {exc}") from None
    return tuple(patterns)


def sensitive_patterns(config: Config) -> tuple[Pattern, ...]:
    """The configured patterns (compiled once), or the defaults when none are configured."""
    spec = config.routing.get("sensitive_patterns", DEFAULT_SENSITIVE_PATTERNS)
    return _compile(json.dumps(spec))


def find_sensitive(texts: list[str], patterns: tuple[Pattern, ...]) -> str | None:
    """The label of the first pattern found in any text, or None."""
    for pattern in patterns:
        if any(pattern.regex.search(text) for text in texts):
            return pattern.label
    return None


def texts_of(task: Task, attachments: list[str] = ()) -> list[str]:
    """Everything of a task that could be sent to a craftsman."""
    texts = [task.content, task.system or "", *attachments]
    if task.context:
        texts.append(json.dumps(task.context, ensure_ascii=False))
    for message in task.messages or ():
        texts.append(json.dumps(message.get("content", ""), ensure_ascii=False))
    return texts


def messages_sensitive(messages: list[dict[str, Any]], patterns: tuple[Pattern, ...]) -> str | None:
    """The pattern found in chat messages about to be sent, or None."""
    return find_sensitive([json.dumps(m.get("content", ""), ensure_ascii=False)
                           for m in messages], patterns)


@functools.lru_cache(maxsize=8)
def _keyword_patterns(spec: str) -> tuple[tuple[str, re.Pattern | None], ...]:
    """One compiled alternation per level: routing runs for every task, twice."""
    keywords = json.loads(spec)
    compiled = []
    for level in LEVELS:
        words = [w for w in keywords.get(level, ()) if isinstance(w, str) and w]
        source = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        compiled.append((level, re.compile(rf"(?i)\b(?:{source})") if words else None))
    return tuple(compiled)


def judge_difficulty(task: Task, config: Config) -> tuple[str, tuple[str, ...]]:
    """The declared difficulty, or the highest level whose keywords appear (default low)."""
    if task.difficulty != "auto":
        return task.difficulty, ()
    spec = json.dumps(config.routing.get("difficulty_keywords", DEFAULT_DIFFICULTY_KEYWORDS),
                      sort_keys=True)
    for level, pattern in _keyword_patterns(spec):
        if pattern is None:
            continue
        found = {m.group(0).lower() for m in pattern.finditer(task.content)}
        if found:
            return level, tuple(sorted(found))
    return "low", ()


def _holds(condition: Any, facts: dict[str, Any]) -> bool:
    if condition is None:
        return True
    if isinstance(condition, str):
        return condition in (facts["sensitivity"], facts["difficulty"], facts["type"])
    if isinstance(condition, dict):
        for key, wanted in condition.items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if facts.get(key) not in options:
                return False
        return True
    return False


def route(task: Task, config: Config, *, attachments: list[str] = (),
          budget_exhausted: bool = False, confidential: bool = False) -> Route:
    """Pick the craftsman for a task, with the reasons (`confidential`: known to be, e.g. a
    task on a repository under `repos.confidential`)."""
    label = find_sensitive(texts_of(task, attachments), sensitive_patterns(config))
    confidential = confidential or task.sensitivity == "confidential" or label is not None
    difficulty, keywords = judge_difficulty(task, config)
    facts = {"sensitivity": "confidential" if confidential else "public",
             "difficulty": difficulty, "type": task.type}
    base = {"confidential": confidential, "pattern": label, "difficulty": difficulty,
            "keywords": keywords}
    chosen, reason, rule = _pick(task, config, facts)
    if chosen is None:
        return Route(None, reason, "invalid" if task.craftsman != "auto" else "policy",
                     rule=rule, **base)
    craftsman = config.craftsmen[chosen]
    notes = []
    if confidential and not craftsman.local:
        local = _local_craftsman(config)
        if local is None:
            return Route(None, "confidential, and no local craftsman is configured", "policy",
                         rule=rule, **base)
        notes.append(f"{chosen} is not local; confidential content goes to {local}")
        chosen, craftsman = local, config.craftsmen[local]
    if budget_exhausted and not craftsman.local:
        return _exhausted(config, chosen, reason, rule, base)
    return Route(chosen, reason, rule=rule, notes=notes, **base)


def _pick(task: Task, config: Config, facts: dict) -> tuple[str | None, str, int | None]:
    if task.craftsman != "auto":
        if task.craftsman not in config.craftsmen:
            return None, (f"craftsman {task.craftsman!r} is not configured (known: "
                          f"{', '.join(sorted(config.craftsmen)) or 'none'})"), None
        return task.craftsman, "asked for by the task", None
    for index, rule in enumerate(config.routing.get("rules") or []):
        if isinstance(rule, dict) and _holds(rule.get("if"), facts):
            name = rule.get("then")
            if name == "local":
                name = "local" if "local" in config.craftsmen else _local_craftsman(config)
            if name in config.craftsmen:
                return name, f"rule {index + 1} ({_describe(rule)})", index + 1
    if len(config.craftsmen) == 1:
        return next(iter(config.craftsmen)), "the only craftsman", None
    return None, "no routing rule matched and the task names no craftsman", None


def _describe(rule: dict) -> str:
    condition = rule.get("if")
    if condition is None:
        return f"otherwise {rule.get('then')}"
    return f"if {json.dumps(condition)} then {rule.get('then')}"


def _local_craftsman(config: Config) -> str | None:
    """The craftsman for confidential work: the first local one that is not echo."""
    for craftsman in config.craftsmen.values():
        if craftsman.local and craftsman.backend != "echo":
            return craftsman.name
    return None


def _exhausted(config: Config, chosen: str, reason: str, rule: int | None, base: dict) -> Route:
    action = config.budget.get("when_exhausted", "local")
    if action == "local":
        local = _local_craftsman(config)
        if local is not None:
            return Route(local, f"{reason}; budget exhausted, so local instead", rule=rule,
                         **base)
        return Route(None, "budget exhausted and no local craftsman", "budget", rule=rule, **base)
    if action == "defer":
        return Route(None, f"budget exhausted; {chosen} waits for the next period", "defer",
                     rule=rule, **base)
    return Route(None, f"budget exhausted for {chosen}", "budget", rule=rule, **base)
