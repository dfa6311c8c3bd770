"""The `serve:` settings, the bearer tokens, and the rule that keeps a tokenless server local."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..errors import ConfigError, UsageError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
BATCH_FILE_BYTES = 200 * 1024 * 1024  # the OpenAI Batch API's limit per input file


@dataclass(frozen=True)
class ServeSettings:
    """`serve: {host, port, tokens_env, wait_s, max_body_bytes}` with their defaults."""

    host: str = "127.0.0.1"
    port: int = 8787
    tokens_env: str = "KOUBOU_SERVE_TOKENS"
    wait_s: float = 600.0
    max_body_bytes: int = 0  # 0: the spool's max_task_bytes (a request becomes one task file)
    keepalive_s: float = 10.0

    def tokens(self) -> tuple[str, ...]:
        """The accepted bearer tokens: the variable's value split on commas and white space."""
        value = os.environ.get(self.tokens_env, "")
        return tuple(t for t in value.replace(",", " ").split() if t)


def _section(config: Config) -> dict[str, Any]:
    """The raw `serve:` mapping: from the Config when it carries one, else from its file."""
    section = getattr(config, "serve", None)
    if section is None and config.path is not None and config.path.exists():
        data = yaml.safe_load(Path(config.path).read_text(encoding="utf-8")) or {}
        section = data.get("serve") if isinstance(data, dict) else None
    if section is None:
        return {}
    if not isinstance(section, dict):
        section = vars(section) if hasattr(section, "__dict__") else None
    if not isinstance(section, dict):
        raise ConfigError("serve: expected a mapping such as {host: 127.0.0.1, port: 8787}")
    return section


def load(config: Config) -> ServeSettings:
    """The serve settings of a config; ConfigError naming a wrong key."""
    section, defaults, values = _section(config), ServeSettings(), {}
    for key, value in section.items():
        if key not in defaults.__dataclass_fields__:
            raise ConfigError(f"serve: unknown setting {key!r}; known: "
                              + ", ".join(defaults.__dataclass_fields__))
        expected = type(getattr(defaults, key))
        ok = isinstance(value, str) if expected is str else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0)
        if not ok or (expected is int and not isinstance(value, int)):
            raise ConfigError(f"serve.{key}: expected {expected.__name__}, got {value!r}")
        values[key] = value
    return ServeSettings(**values)


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: ServeSettings) -> None:
    """Refuse to listen beyond loopback without a token: anyone could spend the budget."""
    if not is_loopback(host) and not settings.tokens():
        raise UsageError(f"refusing to listen on {host} without a token: set "
                         f"{settings.tokens_env} (bearer tokens, comma-separated) or use "
                         "--host 127.0.0.1")
