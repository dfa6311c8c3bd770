"""Settings from config/koubou.yaml (README: Configuration): craftsmen, routing and spool knobs.

Reading is here (bytes, UTF-8, YAML); checking every value is config_check's, a pure function.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import config_check
from .errors import ConfigError

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Endpoint:
    """One server of a craftsman with several (PRODUCT.md §12): where it is and its slots."""

    base_url: str
    max_concurrent: int = 1
    api_key_env: str | None = None
    weight: float = 1.0

    def api_key(self, craftsman: str) -> str:
        """This endpoint's API key from the environment, or the placeholder local servers take."""
        return _key_from(self.api_key_env, craftsman)


@dataclass(frozen=True)
class Craftsman:
    """One craftsman: where it lives, what it may receive and what it costs."""

    name: str
    backend: str
    model: str = ""
    base_url: str = ""
    local: bool = False
    max_concurrent: int = 1
    max_rpm: int | None = None
    max_tpm: int | None = None
    timeout_s: float = 300.0
    max_tokens: int = 2048
    temperature: float | None = None
    reasoning_effort: str | None = None
    token_limit_param: str = "max_tokens"
    retries: int = 2
    api_key_env: str | None = None
    system: str | None = None
    price: dict[str, float] | None = None  # per million tokens; None: looked up by model
    max_cost_usd: float | None = None  # a call's worst case when tokens cannot bound it
    provider: str | None = None  # genai-prices provider id, when base_url does not tell
    latency_ms: float = 0.0
    argv: tuple[str, ...] = ()
    output: str = "text"
    max_output_bytes: int = 4 * 1024 * 1024
    sandbox: str | None = None  # "bwrap": a command craftsman runs under bubblewrap
    sandbox_binds: tuple[str, ...] = ()  # paths the sandboxed agent may write (its login)
    # Several servers instead of one base_url; max_concurrent is then their sum.
    endpoints: tuple[Endpoint, ...] = ()

    def api_key(self) -> str:
        """The API key from the environment; local servers get a placeholder the client requires."""
        return _key_from(self.api_key_env, self.name)


def _key_from(variable: str | None, craftsman: str) -> str:
    if not variable:
        return "not-needed"
    key = os.environ.get(variable)
    if not key:
        raise ConfigError(f"craftsman {craftsman}: environment variable {variable} "
                          "is not set; export it before starting the worker")
    return key


@dataclass(frozen=True)
class SpoolSettings:
    """The `spool:` section."""

    fsync: bool = True
    heartbeat_s: float = 10.0
    lease_s: float = 60.0
    max_attempts: int = 3
    max_task_bytes: int = 1_048_576
    grace_s: float = 3.0
    stop_grace_s: float = 30.0


@dataclass(frozen=True)
class ClusterSettings:
    """The `cluster:` section (docs/CLUSTER.md): the variable that holds the DSN (never the
    DSN itself), this host's name, the craftsmen it takes in for the cluster (None: every one
    a live worker of this home serves), and the lease of a cluster task."""

    dsn_env: str | None = None
    host: str = ""
    serve: tuple[str, ...] | None = None
    lease_s: float = 60.0

    @classmethod
    def parse(cls, section: dict[str, Any] | None) -> ClusterSettings:
        """Settings from a checked section; the host defaults to this machine's name."""
        section = section or {}
        serve = section.get("serve")
        return cls(dsn_env=section.get("dsn_env"), host=section.get("host") or default_host(),
                   serve=None if serve is None else tuple(serve),
                   lease_s=float(section.get("lease_s") or 60.0))

    @property
    def enabled(self) -> bool:
        return bool(self.dsn_env)


def default_host() -> str:
    """This machine's short name, as a cluster host name."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname().split(".")[0])[:63] or "host"


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    craftsmen: dict[str, Craftsman]
    spool: SpoolSettings = SpoolSettings()
    routing: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)
    attach: dict[str, Any] = field(default_factory=dict)
    repos: dict[str, Any] = field(default_factory=dict)
    serve: dict[str, Any] = field(default_factory=dict)
    cluster: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()  # one sentence per unknown key
    path: Path | None = None


CRAFTSMAN_KEYS = {f.name for f in fields(Craftsman)} - {"name"}
SPOOL_KEYS = {f.name for f in fields(SpoolSettings)}


def _craftsman(name: str, spec: dict[str, Any]) -> Craftsman:
    """A checked craftsman's settings as a Craftsman; unset (null) keys take the defaults."""
    values = {k: v for k, v in spec.items() if k in CRAFTSMAN_KEYS and v is not None}
    values.setdefault("model", spec["backend"])
    values.setdefault("local", spec["backend"] == "echo")
    values["argv"] = tuple(values.get("argv", ()))
    values["sandbox_binds"] = tuple(values.get("sandbox_binds", ()))
    if values.get("endpoints"):
        values["endpoints"] = tuple(_endpoint(one, values) for one in values["endpoints"])
        values["max_concurrent"] = sum(e.max_concurrent for e in values["endpoints"])
    return Craftsman(name=name, **values)


def _endpoint(spec: dict[str, Any], craftsman: dict[str, Any]) -> Endpoint:
    """An endpoint; what it leaves unset it takes from its craftsman (slots, key)."""
    return Endpoint(base_url=spec["base_url"],
                    max_concurrent=spec.get("max_concurrent") or craftsman.get("max_concurrent", 1),
                    api_key_env=spec.get("api_key_env") or craftsman.get("api_key_env"),
                    weight=float(spec.get("weight") or 1.0))


def _spool(spec: dict[str, Any] | None) -> SpoolSettings:
    return SpoolSettings(**{k: v for k, v in (spec or {}).items() if k in SPOOL_KEYS})


def _rejected(problems: list[str], warnings: list[str], path: Path | None) -> ConfigError:
    where = f"{path}: " if path else ""
    others = len(problems) - 1
    more = (f" (and {others} more problem{'s' if others > 1 else ''}; `koubou doctor` lists "
            "them all)" if others else "")
    return ConfigError(f"{where}{problems[0]}{more}", problems, warnings)


def parse(data: Any, path: Path | None = None) -> Config:
    """Build a Config from the decoded YAML document; ConfigError listing every problem."""
    document, found = config_check.check(data, asdict(SpoolSettings()))
    if found.problems:
        raise _rejected(found.problems, found.warnings, path)
    return Config(
        craftsmen={name: _craftsman(name, spec) for name, spec in document["craftsmen"].items()},
        spool=_spool(document.get("spool")),
        routing=document.get("routing") or {},
        budget=document.get("budget") or {},
        hooks=document.get("hooks") or {},
        attach=document.get("attach") or {},
        repos=document.get("repos") or {},
        serve=document.get("serve") or {},
        cluster=document.get("cluster") or {},
        warnings=tuple(found.warnings),
        path=path,
    )


def _decode(path: Path, raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} on line "
                          f"{line}); save it as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(exc.problem or exc.context or "a syntax error").split())
        raise ConfigError(f"{path} is not valid YAML: {what}{at}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. a date like 2026-13-45
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        raise ConfigError(f"{path} holds no settings; it needs at least a craftsmen: section "
                          "(`koubou init` writes a commented one into a new home)")
    return data


def _warn_once(path: Path, warnings: tuple[str, ...]) -> None:
    # Commands and the MCP server read the config more than once; say each thing once.
    for warning in warnings:
        if (str(path), warning) not in _warned:
            _warned.add((str(path), warning))
            log.warning("%s: %s", path, warning)


def load(path: Path) -> Config:
    """Read and check a config file; a missing file is an error that says to run `koubou init`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no config at {path}; run `koubou init` to create the home") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        config = parse(_decode(path, raw), path)
    except ConfigError as exc:
        _warn_once(path, tuple(exc.warnings))
        raise
    _warn_once(path, config.warnings)
    return config


DEFAULT_CONFIG = (Path(__file__).parent / "koubou.yaml").read_text(encoding="utf-8")
