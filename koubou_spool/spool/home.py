"""Which home a command uses (README: Layout of a home), and `koubou init`."""

from __future__ import annotations

import os
from pathlib import Path

from .. import config as config_module
from ..config import Config
from ..errors import SpoolError
from . import permissions

SYSTEM_HOME = Path("/var/koubou")
STATE_DIRS = ("pending", "in_progress", "completed", "failed")


def user_home() -> Path:
    """The per-user fallback home."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "koubou"


def _usable(path: Path) -> bool:
    if path.is_dir():
        return os.access(path, os.W_OK | os.X_OK)
    parent = path.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def resolve(home: str | os.PathLike | None = None) -> Path:
    """--home, else $KOUBOU_HOME, else /var/koubou when usable, else ~/.local/share/koubou."""
    chosen = home or os.environ.get("KOUBOU_HOME")
    if chosen:
        return Path(chosen).expanduser().absolute()
    return SYSTEM_HOME if _usable(SYSTEM_HOME) else user_home()


def config_path(home: Path, override: str | os.PathLike | None = None) -> Path:
    """--config, else <home>/config/koubou.yaml."""
    return Path(override).expanduser().absolute() if override else home / "config" / "koubou.yaml"


def load_config(home: Path, override: str | os.PathLike | None = None) -> Config:
    """The home's configuration."""
    return config_module.load(config_path(home, override))


def init(home: Path, group: str | None = None) -> list[Path]:
    """Create the home's directories with the modes of §2, shared with `group` (default: an
    existing home's group, else the owner's primary group), and a default config; never
    overwrite. Returns what it made; `permissions.repair` fixes what already existed."""
    permissions.require_owner(home)
    gid = permissions.home_gid(home, group)
    try:
        made = permissions.lay_out(home, gid)
        config_file = home / "config" / "koubou.yaml"
        if not config_file.exists():
            fd = permissions.open_file(config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                       permissions.PRIVATE)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(config_module.DEFAULT_CONFIG)
            made.append(config_file)
    except SpoolError:
        raise
    except OSError as exc:
        raise SpoolError(f"cannot create the home at {home}: {exc.strerror}; choose another with "
                         "--home or KOUBOU_HOME") from None
    return made
