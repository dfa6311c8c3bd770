"""Every config value checked when the config is read (README: Configuration). Pure: no I/O.

`check()` walks the parsed YAML document against the schema below and returns it normalized
(durations in seconds; a lone value where a list is asked, such as `alert_percent: 80`, as a list
of one), with one sentence per problem and one warning per key that nothing reads. Problems are
collected rather than raised so that `koubou doctor` can list them all at once.

A checker is `(path, value, findings) -> value`: it records what is wrong under the key's dotted
path and returns the value as the rest of the package should see it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

BACKENDS = ("openai", "echo", "command")
TOKEN_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens")
OUTPUT_FORMATS = ("text", "claude-json", "codex-jsonl")
EXHAUSTED_ACTIONS = ("local", "defer", "fail")
LEVELS = ("high", "medium", "low")
# What a rule's `if` may test: the facts the router knows about a task (router._holds).
FACTS: dict[str, tuple[str, ...] | None] = {
    "sensitivity": ("public", "confidential"), "difficulty": LEVELS, "type": None}
CONDITION_WORDS = ("confidential", "public", *LEVELS)
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")  # craftsman names end up in unit names and labels
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
HOST_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")  # a cluster host: in ids and LISTEN payloads
DURATION_RE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)")
UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|[^/:]+:")  # scheme://, or git's host:path
AUTHOR_RE = re.compile(r"[^<>\n]+ <[^<>\s]+>")


@dataclass
class Findings:
    """What a check found: one sentence per problem, one per unknown key."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def wrong(self, path: str, expected: str, value: Any, *, secret: bool = False) -> None:
        """Record that the value at path is not what was expected."""
        self.problems.append(f"{path}: expected {expected}, found {shown(value, secret)}")


Checker = Callable[[str, Any, Findings], Any]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def shown(value: Any, secret: bool = False) -> str:
    """A found value for a message: short, with its kind; a secret one by its kind alone."""
    if value is None:
        return "nothing"
    if secret:
        return f"{_kind(value)} (not shown)"
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # a YAML alias can make a list that contains itself
        text = repr(value)
    return f"{text[:57] + '...' if len(text) > 60 else text} ({_kind(value)})"


def join(path: str, key: Any) -> str:
    """The dotted path of a key inside path."""
    return f"{path}.{key}" if path else str(key)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- scalar checkers ---------------------------------------------------------------------------

def nullable(checker: Checker) -> Checker:
    """The checker, but `key:` with no value (null) means "not set"."""
    def check(path: str, value: Any, found: Findings) -> Any:
        return None if value is None else checker(path, value, found)
    return check


def boolean(path: str, value: Any, found: Findings) -> Any:
    """true or false."""
    if not isinstance(value, bool):
        found.wrong(path, "true or false", value)
    return value


def text(path: str, value: Any, found: Findings) -> Any:
    """Any string."""
    if not isinstance(value, str):
        found.wrong(path, "a string", value)
    return value


def word(path: str, value: Any, found: Findings) -> Any:
    """A non-empty string."""
    if not (isinstance(value, str) and value.strip()):
        found.wrong(path, "a non-empty string", value)
    return value


def choice(*options: str) -> Checker:
    """One of a few words."""
    def check(path: str, value: Any, found: Findings) -> Any:
        if value not in options:
            found.wrong(path, f"one of {', '.join(options)}", value)
        return value
    return check


def _range_words(low: float, high: float | None, above: bool) -> str:
    if high is not None:
        return f"greater than {low:g} and at most {high:g}" if above else f"from {low:g} to {high:g}"
    return f"greater than {low:g}" if above else f"of at least {low:g}"


def number(low: float = 0, high: float | None = None, *, above: bool = False,
           what: str = "a number") -> Checker:
    """A finite number in a range (`above`: low itself excluded)."""
    def check(path: str, value: Any, found: Findings) -> Any:
        if not _is_number(value) or (value <= low if above else value < low) or (
                high is not None and value > high):
            found.wrong(path, f"{what} {_range_words(low, high, above)}", value)
        return value
    return check


def integer(low: int = 0, high: int | None = None) -> Checker:
    """A whole number in a range."""
    def check(path: str, value: Any, found: Findings) -> Any:
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low
                and (high is None or value <= high)):
            found.wrong(path, f"a whole number {_range_words(low, high, False)}", value)
        return value
    return check


def duration(low: float = 0, *, above: bool = True) -> Checker:
    """Seconds: a number, or a number with a unit (500ms, 30s, 5m, 2h, 1d)."""
    def check(path: str, value: Any, found: Findings) -> Any:
        seconds = value if _is_number(value) else None
        if isinstance(value, str):
            match = DURATION_RE.fullmatch(value.strip())
            seconds = float(match["number"]) * UNIT_S[match["unit"]] if match else None
        if seconds is None or (seconds <= low if above else seconds < low):
            found.wrong(path, f"a duration in seconds {_range_words(low, None, above)} (a "
                        "number, or one with a unit: 500ms, 30s, 5m, 2h, 1d)", value)
            return value
        return seconds
    return check


def url(path: str, value: Any, found: Findings) -> Any:
    """An http(s) URL with a host."""
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        found.wrong(path, "an http:// or https:// URL such as http://localhost:1234/v1", value)
    return value


def env_name(path: str, value: Any, found: Findings) -> Any:
    """The name of an environment variable; never shown, in case a key was pasted instead."""
    if not (isinstance(value, str) and ENV_NAME_RE.fullmatch(value)):
        found.wrong(path, "the name of an environment variable such as OPENAI_API_KEY (the "
                    "secret itself stays in the environment)", value, secret=True)
    return value


def zone(path: str, value: Any, found: Findings) -> Any:
    """An IANA time zone that zoneinfo knows."""
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        found.wrong(path, "an IANA time zone such as Asia/Tokyo or UTC", value)
    return value


def regex(path: str, value: Any, found: Findings) -> Any:
    """A regular expression that compiles."""
    try:
        re.compile(value)
    except (re.error, TypeError) as exc:
        detail = f", which does not compile: {exc}" if isinstance(exc, re.error) else ""
        found.problems.append(f"{path}: expected a regular expression, found "
                              f"{shown(value)}{detail}")
    return value


def argv(path: str, value: Any, found: Findings) -> Any:
    """A command as a non-empty list of strings, never a shell line."""
    if not (isinstance(value, list) and value and all(isinstance(a, str) and a for a in value)):
        found.wrong(path, "a command as a list of strings such as [notify-send, koubou] "
                    "(never a shell line)", value)
    return value


# --- containers ----------------------------------------------------------------------------------

def list_of(item: Checker, what: str) -> Checker:
    """A list whose items pass `item`; a lone item is taken as a list of one."""
    def check(path: str, value: Any, found: Findings) -> Any:
        if isinstance(value, dict):
            found.wrong(path, what, value)
            return value
        items = value if isinstance(value, list) else [] if value is None else [value]
        return [item(f"{path}[{index}]", one, found) for index, one in enumerate(items)]
    return check


def _unknown(path: str, key: Any, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(known)})"
    return f"{join(path, key)}: unknown setting, ignored{hint}"


def section(fields: Mapping[str, Checker], required: tuple[str, ...] = (),
            what: str = "a mapping of settings") -> Checker:
    """A mapping of known keys; an unknown key is warned about, a missing required one is not
    allowed."""
    def check(path: str, value: Any, found: Findings) -> Any:
        if not isinstance(value, dict):
            found.wrong(path, what, value)
            return value
        checked = {}
        for key, item in value.items():
            if key in fields:
                checked[key] = fields[key](join(path, key), item, found)
            else:
                found.warnings.append(_unknown(path, key, fields))
        for key in required:
            if key not in value:  # the key's own checker says what it wants
                checked[key] = fields[key](join(path, key), None, found)
        return checked
    return check


# --- craftsmen -------------------------------------------------------------------------------------

SANDBOXES = ("bwrap",)
USD = number(what="an amount in USD")
PRICE = section({key: number(what="a price in USD per million tokens") for key in
                 ("input_per_mtok", "output_per_mtok", "cache_read_per_mtok")},
                required=("input_per_mtok", "output_per_mtok"),
                what="{input_per_mtok, output_per_mtok} (optional cache_read_per_mtok)")
CRAFTSMAN_FIELDS: dict[str, Checker] = {
    "backend": choice(*BACKENDS), "model": word, "base_url": url, "local": boolean,
    "max_concurrent": integer(1), "max_rpm": nullable(integer(1)), "max_tpm": nullable(integer(1)),
    "timeout_s": duration(), "max_tokens": integer(1),
    "temperature": nullable(number(0, 2)), "reasoning_effort": nullable(word),
    "token_limit_param": choice(*TOKEN_LIMIT_PARAMS), "retries": integer(0),
    "api_key_env": nullable(env_name), "system": nullable(text), "price": nullable(PRICE),
    "max_cost_usd": nullable(USD), "provider": nullable(word),
    "latency_ms": number(), "argv": argv, "output": choice(*OUTPUT_FORMATS),
    "max_output_bytes": integer(1), "sandbox": nullable(choice(*SANDBOXES)),
    "sandbox_binds": list_of(text, "a list of paths bound writable into the sandbox's home"),
}
ENDPOINT = section({"base_url": url, "max_concurrent": integer(1),
                    "api_key_env": nullable(env_name), "weight": number(above=True)},
                   required=("base_url",),
                   what="{base_url, max_concurrent} (optional api_key_env, weight)")
CRAFTSMAN_FIELDS["endpoints"] = list_of(ENDPOINT, "a list of endpoints such as "
                                        "[{base_url: http://gpu1:1234/v1, max_concurrent: 4}]")
NEEDS = {"openai": ("base_url", "model"), "command": ("argv",)}

_craftsman_section = section(CRAFTSMAN_FIELDS, required=("backend",))


def craftsman(path: str, value: Any, found: Findings) -> Any:
    """One craftsman: known keys, and what its backend cannot do without."""
    spec = _craftsman_section(path, value, found)
    if isinstance(spec, dict) and "endpoints" in spec:
        _check_endpoints(path, spec, found)
    if isinstance(spec, dict) and isinstance(spec.get("backend"), str):
        for key in NEEDS.get(spec["backend"], ()):
            if key not in spec and not (key == "base_url" and "endpoints" in spec):
                article = "an" if spec["backend"][0] in "aeiou" else "a"
                found.wrong(join(path, key), f"a value ({article} {spec['backend']} craftsman "
                            f"needs {' and '.join(NEEDS[spec['backend']])})", None)
    return spec


def _check_endpoints(path: str, spec: dict, found: Findings) -> None:
    """Endpoints: only for openai craftsmen, instead of base_url, at least one, each URL once."""
    where = join(path, "endpoints")
    endpoints = spec["endpoints"]
    if spec.get("backend") != "openai":
        found.wrong(where, "no endpoints (only an openai craftsman has them)", endpoints)
    elif "base_url" in spec:
        found.wrong(where, "either endpoints or base_url, not both (a lone base_url is one "
                    "endpoint)", endpoints)
    elif isinstance(endpoints, list) and not endpoints:
        found.wrong(where, "at least one endpoint", endpoints)
    urls = [e.get("base_url") for e in endpoints if isinstance(e, dict)] \
        if isinstance(endpoints, list) else []
    for index, one in enumerate(urls):
        if isinstance(one, str) and one in urls[:index]:
            found.wrong(f"{where}[{index}].base_url", "each endpoint's base_url once", one)


def craftsmen(path: str, value: Any, found: Findings) -> Any:
    """The craftsmen by name: at least one."""
    if not isinstance(value, dict) or not value:
        found.wrong(path, "a mapping of at least one craftsman (name: settings)", value)
        return value
    for name in value:
        if not (isinstance(name, str) and NAME_RE.fullmatch(name)) or name == "auto":
            found.wrong(path, "craftsman names of letters, digits, '.', '_' or '-' (and not "
                        "auto, which asks the router)", name)
    return {name: craftsman(join(path, name), spec, found) for name, spec in value.items()}


# --- routing -----------------------------------------------------------------------------------------

def _pattern(path: str, value: Any, found: Findings) -> Any:
    if isinstance(value, dict):
        return section({"name": word, "pattern": regex}, required=("pattern",))(path, value, found)
    return regex(path, value, found)


def _condition_values(path: str, fact: str, wanted: Any, found: Findings) -> None:
    options = FACTS[fact]
    for one in wanted if isinstance(wanted, list) else [wanted]:
        if not isinstance(one, str) or (options is not None and one not in options):
            found.wrong(path, f"one of {', '.join(options)}" if options else "a task type",
                        one)


def condition(path: str, value: Any, found: Findings) -> Any:
    """A rule's `if`: a word, or a mapping of task facts to the values that match."""
    if value is None:
        return value
    if isinstance(value, dict):
        for fact, wanted in value.items():
            if fact in FACTS:
                _condition_values(join(path, fact), fact, wanted, found)
            else:
                found.wrong(path, "conditions on sensitivity, difficulty or type", fact)
    elif value not in CONDITION_WORDS:
        found.wrong(path, f"{', '.join(CONDITION_WORDS)} or a mapping of "
                    f"{', '.join(FACTS)} (for a task type: {{type: NAME}})", value)
    return value


def _then(path: str, value: Any, found: Findings) -> Any:
    if not (isinstance(value, str) and value):
        found.wrong(path, "the name of the craftsman the rule picks", value)
    return value


RULE = section({"if": condition, "then": _then}, required=("then",),
               what="a rule such as {if: confidential, then: local}")
ROUTING = section({
    "sensitive_patterns": list_of(_pattern, "a list of regular expressions"),
    "difficulty_keywords": section({level: list_of(text, "a list of words")
                                    for level in LEVELS}),
    "rules": list_of(RULE, "a list of rules such as [{if: confidential, then: local}]"),
})


# --- the other sections ---------------------------------------------------------------------------

BUDGET = section({
    "daily_usd": nullable(USD), "monthly_usd": nullable(USD),
    "timezone": nullable(zone),
    "alert_percent": list_of(number(0, 100, above=True, what="a percentage"),
                             "a list of percentages such as [80, 95]"),
    "alert_command": nullable(argv), "when_exhausted": choice(*EXHAUSTED_ACTIONS),
})
SPOOL_FIELDS: dict[str, Checker] = {
    "fsync": boolean, "heartbeat_s": duration(), "lease_s": duration(),
    "max_attempts": integer(1), "max_task_bytes": integer(1), "grace_s": duration(),
    "stop_grace_s": duration(above=False),
}
def location(path: str, value: Any, found: Findings) -> Any:
    """Where a repository may be: an absolute or ~/ path, or a URL prefix (scheme:// or git's
    host:path), as repo/policy.py reads it."""
    if not (isinstance(value, str) and (value.startswith(("/", "~")) or URL_RE.match(value))):
        found.wrong(path, "an absolute path, a ~/ path or a URL prefix", value)
    return value


def author(path: str, value: Any, found: Findings) -> Any:
    """A commit author as git takes it."""
    if not (isinstance(value, str) and AUTHOR_RE.fullmatch(value)):
        found.wrong(path, "an author such as 'Name <email>'", value)
    return value


def host_name(path: str, value: Any, found: Findings) -> Any:
    """A host's name in the cluster: letters, digits, dots, dashes and underscores."""
    if not (isinstance(value, str) and HOST_RE.fullmatch(value)):
        found.wrong(path, "a host name of letters, digits, '.', '-' and '_' (at most 63)", value)
    return value


PATHS = list_of(text, "a list of paths")
LOCATIONS = list_of(location, "a list of paths and URL prefixes")
TOP = section({
    "craftsmen": craftsmen,
    "routing": nullable(ROUTING),
    "budget": nullable(BUDGET),
    "hooks": nullable(section({"on_finish": nullable(argv)})),
    "attach": nullable(section({"allowed_dirs": PATHS, "max_bytes": integer(1)})),
    "spool": nullable(section(SPOOL_FIELDS)),
    "repos": nullable(section({"allowed": LOCATIONS, "confidential": LOCATIONS,
                               "verify_timeout_s": duration(), "push": boolean,
                               "max_worktrees": nullable(integer(1)), "author": author})),
    "serve": nullable(section({"host": word, "port": integer(1, 65535),
                               "tokens_env": env_name, "wait_s": duration()})),
    "cluster": nullable(section({"dsn_env": env_name, "host": host_name,
                                 "serve": nullable(list_of(word, "a list of craftsman names")),
                                 "lease_s": duration()})),
}, required=("craftsmen",))


# --- across sections --------------------------------------------------------------------------------

def _check_rules(document: dict, found: Findings) -> None:
    """Each rule's `then` names a craftsman (`local`: the first local one, as the router reads
    it)."""
    names = document.get("craftsmen")
    rules = (document.get("routing") or {}).get("rules")
    if not isinstance(names, dict) or not isinstance(rules, list):
        return
    has_local = any(isinstance(spec, dict) and spec.get("local") and spec.get("backend") != "echo"
                    for spec in names.values())
    for index, rule in enumerate(rules):
        then = rule.get("then") if isinstance(rule, dict) else None
        if isinstance(then, str) and then not in names and not (then == "local" and has_local):
            hint = "; `local` means the first local: true craftsman, and none is" \
                if then == "local" else ""
            found.wrong(f"routing.rules[{index}].then", "a configured craftsman "
                        f"({', '.join(map(str, names))}){hint}", then)


def _check_cluster(document: dict, found: Findings) -> None:
    """The craftsmen a host serves for the cluster are configured ones."""
    names = document.get("craftsmen")
    serve = (document.get("cluster") or {}).get("serve") if isinstance(
        document.get("cluster"), dict) else None
    if not isinstance(names, dict) or not isinstance(serve, list):
        return
    for index, name in enumerate(serve):
        if isinstance(name, str) and name not in names:
            found.wrong(f"cluster.serve[{index}]", "a configured craftsman "
                        f"({', '.join(map(str, names))})", name)


def _check_lease(spool: Any, defaults: Mapping[str, Any], found: Findings) -> None:
    """A live worker's lease must outlast its heartbeat, or its tasks are taken from it."""
    values = {**defaults, **(spool if isinstance(spool, dict) else {})}
    heartbeat, lease = values.get("heartbeat_s"), values.get("lease_s")
    if _is_number(heartbeat) and _is_number(lease) and 0 < lease <= heartbeat:
        found.wrong("spool.lease_s", f"more than spool.heartbeat_s ({heartbeat:g} s: a live "
                    "worker's lease must outlast its heartbeat)", lease)


def check(document: Any, spool_defaults: Mapping[str, Any] | None = None
          ) -> tuple[Any, Findings]:
    """The document normalized, and every problem and unknown key found in it."""
    found = Findings()
    if document is None:
        found.problems.append("holds no settings; it needs at least a craftsmen: section")
        return document, found
    if not isinstance(document, dict):
        found.wrong("the top level", "a mapping of sections (craftsmen, routing, budget, "
                    "spool, ...)", document)
        return document, found
    checked = TOP("", document, found)
    _check_rules(checked, found)
    _check_cluster(checked, found)
    _check_lease(checked.get("spool"), spool_defaults or {}, found)
    return checked, found
