"""`koubou doctor`: check that a home can work, and say how to fix what cannot.

Each check returns a list of problems; a problem is one sentence naming what is wrong and the
fix. Errors stop work (exit 4); warnings are risks worth fixing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sqlite3
import stat
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spool import ledger, permissions, task as task_format
from ..spool.entries import BRIDGE_PREFIX
from ..spool.files import Spool
from .. import config as config_module
from ..config import Config, Craftsman
from ..craft.backends import sandbox
from ..repo import mirror as repo_mirror, worktree
from ..repo.policy import RepoSettings
from ..errors import ConfigError, KoubouError

log = logging.getLogger(__name__)

ERROR = "error"
WARNING = "warning"
INFO = "info"  # a fact worth showing, never a problem
SPOOL_DIRS = ("tasks/tmp", "tasks/pending", "tasks/in_progress", "tasks/completed",
              "tasks/failed", "db", "run/workers")
INOTIFY = Path("/proc/sys/fs/inotify")
# (setting, lowest sane value, why it matters)
INOTIFY_LIMITS = (
    ("max_user_watches", 1024, "each worker, `koubou wait` and `koubou top` watch the spool "
     "directories"),
    ("max_user_instances", 64, "every worker, `koubou-submit --wait`, `koubou wait` and "
     "`koubou top` opens its own inotify instance; past the limit they fail to start"),
    ("max_queued_events", 16384, "a burst of submits beyond the queue overflows it and workers "
     "fall back to a full rescan"),
)
MAX_SKEW_S = 2.0  # leases run on the database's clock; budget days and timestamps on hosts'
SECRET_WORDS = ("api_key:", "apikey:", "password", "secret", "token:", "bearer ")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: its level and one sentence with the fix."""

    level: str
    message: str
    craftsman: str | None = None


@dataclass
class Check:
    """A named check and the problems it found."""

    name: str
    problems: list[Problem] = field(default_factory=list)

    @property
    def status(self) -> str:
        """'ok', 'warning' or 'error': the worst of its problems."""
        levels = {p.level for p in self.problems}
        return ERROR if ERROR in levels else WARNING if WARNING in levels else "ok"


def run(home: Path, config_path: Path, timeout: float = 5.0) -> list[Check]:
    """Every check of a home, in a fixed order."""
    checks = [Check("home", check_home(home)), Check("inotify", check_inotify(INOTIFY)),
              Check("ledger", check_ledger(home / "db" / "koubou.db")),
              Check("permissions", check_permissions(home))]
    try:
        config = config_module.load(config_path)
    except ConfigError as exc:
        checks.insert(1, Check("config", [Problem(ERROR, p) for p in exc.problems]
                               + [Problem(WARNING, w) for w in exc.warnings]))
        return checks
    unknown = [Problem(WARNING, w) for w in config.warnings]
    checks.insert(1, Check("config", unknown + check_config_file(config_path, config)))
    checks.append(Check("api keys", check_api_keys(config)))
    checks.append(Check("repositories", check_repositories(home, config)))
    if config_module.ClusterSettings.parse(config.cluster).enabled:
        checks.append(Check("cluster", check_cluster(config) + check_faces(home, config)))
    checks += check_craftsmen(config, timeout)
    return checks


def broken_craftsmen(checks: list[Check]) -> list[str]:
    """Names of craftsmen with an error, in order."""
    names = [p.craftsman for c in checks for p in c.problems if p.level == ERROR and p.craftsman]
    return list(dict.fromkeys(names))


def as_dict(checks: list[Check]) -> dict[str, Any]:
    """The checks as plain data, for --json."""
    return {"ok": all(c.status != ERROR for c in checks),
            "broken_craftsmen": broken_craftsmen(checks),
            "checks": [{"name": c.name, "status": c.status,
                        "problems": [{"level": p.level, "message": p.message} for p in c.problems]}
                       for c in checks]}


# --- the home --------------------------------------------------------------------------------

def check_home(home: Path) -> list[Problem]:
    """The home exists, is writable, and has every spool directory."""
    if not home.is_dir():
        return [Problem(ERROR, f"the home {home} does not exist; run `koubou init --home {home}`")]
    if not os.access(home, os.W_OK | os.X_OK):
        return [Problem(ERROR, f"the home {home} is not writable by this user (uid {os.getuid()}); "
                        "run koubou as the home's owner or chown it")]
    problems = []
    for name in SPOOL_DIRS:
        path = home / name
        if not path.is_dir():
            problems.append(Problem(ERROR, f"{path} is missing; run `koubou init --home {home}` "
                                    "(it never overwrites anything)"))
        elif not os.access(path, os.W_OK | os.X_OK):
            problems.append(Problem(ERROR, f"{path} is not writable by this user; chown the "
                                    "home to the user that runs the workers"))
    return problems


def check_permissions(home: Path) -> list[Problem]:
    """Every path whose mode or group breaks PRODUCT.md §2 (who may do what), by name.

    Warnings, like a readable config: the home still works, but it is open to the wrong people
    or closed to the right ones.
    """
    return [Problem(WARNING, message) for message in permissions.audit(home)]


def check_config_file(path: Path, config: Config) -> list[Problem]:
    """A config that names API key variables or holds secrets is private: 0600 in a 0700 dir."""
    text = path.read_text(encoding="utf-8", errors="replace").lower()
    names_keys = any(c.api_key_env for c in config.craftsmen.values())
    if not names_keys and not any(word in text for word in SECRET_WORDS):
        return []
    why = "names API key variables" if names_keys else "looks like it holds secrets"
    problems = []
    for target, wanted in ((path, 0o600), (path.parent, 0o700)):
        mode = stat.S_IMODE(os.stat(target).st_mode)
        if mode & 0o077:
            problems.append(Problem(WARNING, f"{target} is readable by group or others (mode "
                                    f"{mode:04o}) while the config {why}; run "
                                    f"`chmod {wanted:o} {target}`"))
    return problems


def check_api_keys(config: Config) -> list[Problem]:
    """Each craftsman's api_key_env is set in this environment."""
    return [Problem(ERROR, f"craftsman {c.name}: environment variable {c.api_key_env} is not "
                    "set; export it (under systemd, put it in /etc/koubou/env)", c.name)
            for c in config.craftsmen.values()
            if c.api_key_env and not os.environ.get(c.api_key_env)]


def check_inotify(root: Path) -> list[Problem]:
    """The kernel's inotify limits leave room for workers and waiters."""
    problems = []
    for name, lowest, why in INOTIFY_LIMITS:
        try:
            value = int((root / name).read_text().strip())
        except (OSError, ValueError):
            problems.append(Problem(WARNING, f"cannot read {root / name}; koubou needs inotify "
                                    "(Linux), check that /proc is mounted"))
            continue
        if value < lowest:
            problems.append(Problem(WARNING, f"fs.inotify.{name} is {value}, below {lowest}: "
                                    f"{why}; raise it with `sysctl -w fs.inotify.{name}="
                                    f"{lowest}` and in /etc/sysctl.d/"))
    return problems


def check_ledger(path: Path) -> list[Problem]:
    """The ledger passes `PRAGMA integrity_check` and has every migration applied."""
    if not path.exists():
        return [Problem(WARNING, f"no ledger at {path}; run `koubou init` (or `koubou ledger "
                        "rebuild` to recreate it from the outcome files)")]
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
        try:
            broken = ledger.integrity_problems(conn)
            missing = ledger.missing_migrations(conn)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return [Problem(ERROR, f"the ledger {path} cannot be read ({exc}); move it aside and run "
                        "`koubou ledger rebuild`")]
    problems = []
    if broken:
        problems.append(Problem(ERROR, f"the ledger {path} is damaged ({'; '.join(broken[:3])}); "
                                "stop the workers and run `koubou ledger rebuild`"))
    if missing:
        problems.append(Problem(WARNING, f"the ledger lacks migrations {', '.join(missing)}; "
                                "run `koubou init` to apply them"))
    return problems


# --- craftsmen -------------------------------------------------------------------------------

def check_cluster(config: Config) -> list[Problem]:
    """The cluster's PostgreSQL (docs/CLUSTER.md): its DSN set and reachable, its schema one
    this koubou knows, this host's clock close to the database's."""
    settings = config_module.ClusterSettings.parse(config.cluster)
    dsn = os.environ.get(settings.dsn_env or "")
    if not dsn:
        return [Problem(ERROR, f"cluster.dsn_env names {settings.dsn_env}, which is not set; "
                        "export the cluster's PostgreSQL DSN in it before `koubou cluster`")]
    try:
        from ..spool import cluster
    except ImportError as exc:
        return [Problem(ERROR, f"the cluster needs psycopg 3 ({exc}); install it with "
                        "pip install 'koubou-spool[cluster]'")]
    handle = cluster.Cluster(dsn, host=settings.host)
    try:
        version = handle.schema_version()
        skew = handle.clock_skew()
    except cluster.ClusterUnavailable as exc:
        return [Problem(ERROR, str(exc))]
    finally:
        handle.close_quietly()
    problems = [Problem(INFO, f"host {settings.host}: the cluster's PostgreSQL answers; "
                        f"schema version {version} of {cluster.SCHEMA_VERSION}; this clock is "
                        f"{skew:+.3f} s from the database's")]
    if version > cluster.SCHEMA_VERSION:
        problems.append(Problem(ERROR, f"the cluster database has schema version {version}, "
                                f"newer than this koubou's {cluster.SCHEMA_VERSION}: upgrade "
                                "koubou on this host"))
    elif version < cluster.SCHEMA_VERSION:
        problems.append(Problem(WARNING, f"the cluster database has schema version {version} "
                                f"of {cluster.SCHEMA_VERSION}; the next `koubou cluster` "
                                "migrates it"))
    if abs(skew) > MAX_SKEW_S:
        problems.append(Problem(WARNING, f"this host's clock is {skew:+.1f} s from the cluster "
                                "database's: budget days and timestamps drift between hosts; "
                                "run NTP (chrony, systemd-timesyncd)"))
    return problems


def check_faces(home: Path, config: Config) -> list[Problem]:
    """Tasks a bridge of this home forwarded whose bridge is dead, with no bridge running to
    adopt them: they wait for the next `koubou cluster` (docs/CLUSTER.md), and nothing else
    says so."""
    try:
        spool = Spool.open(home, config.spool)
        if spool.bridge_running():
            return []  # it adopts them at its next heartbeat
        left = sorted(match["name"] for _, match in spool.claims()
                      if match["worker"].startswith(BRIDGE_PREFIX))
    except (KoubouError, OSError):
        return []  # a home that cannot be read: the home check says why
    if not left:
        return []
    shown = ", ".join(task_format.id_from_name(name) or name for name in left[:5])
    return [Problem(WARNING, f"{len(left)} task(s) forwarded to the cluster by a bridge that is "
                    f"no longer running ({shown}{', ...' if len(left) > 5 else ''}) wait for "
                    "the next `koubou cluster` of this home, which delivers their outcomes")]


def check_repositories(home: Path, config: Config) -> list[Problem]:
    """The mirrors of repository tasks and their size on disk; whether any repo is allowed."""
    sizes = repo_mirror.mirrors_size(home) if (home / "repos").is_dir() else {}
    found = [Problem(INFO, f"mirror {name}: {size / 1e6:.1f} MB") for name, size in sizes.items()]
    if sizes:
        found.append(Problem(INFO, f"{len(sizes)} mirrors, {sum(sizes.values()) / 1e6:.1f} MB in "
                                   f"{home / 'repos'}; live worktrees: "
                                   f"{worktree.live_worktrees(home)}"))
    if config.repos and not RepoSettings.parse(config.repos).allowed:
        found.append(Problem(WARNING, "repos: is set but repos.allowed is empty, so every "
                                      "repository task fails as policy; list the paths or URL "
                                      "prefixes tasks may name"))
    return found


def check_craftsmen(config: Config, timeout: float) -> list[Check]:
    """One check per craftsman, endpoints probed in parallel so a dead one costs one timeout."""
    crafts = list(config.craftsmen.values())
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(crafts)))) as pool:
        found = list(pool.map(lambda c: check_craftsman(c, timeout), crafts))
    return [Check(f"craftsman {c.name}", problems) for c, problems in zip(crafts, found, strict=True)]


def check_craftsman(craftsman: Craftsman, timeout: float) -> list[Problem]:
    """The craftsman can be reached: its server lists the model, or its command exists."""
    if craftsman.endpoints:
        return check_endpoints(craftsman, timeout)
    if craftsman.backend == "openai":
        return check_openai(craftsman, timeout)
    if craftsman.backend == "command":
        return check_command(craftsman)
    return []


def check_endpoints(craftsman: Craftsman, timeout: float) -> list[Problem]:
    """Each endpoint as a craftsman of its own: reachable and listing the model, or why not.
    One dead endpoint is an error: the others carry its traffic, but the operator should know."""
    found = []
    for endpoint in craftsman.endpoints:
        alone = dataclasses.replace(craftsman, base_url=endpoint.base_url,
                                    api_key_env=endpoint.api_key_env, endpoints=())
        problems = check_openai(alone, timeout)
        found += problems or [Problem(INFO, f"craftsman {craftsman.name}: endpoint "
                                            f"{endpoint.base_url} answers and lists "
                                            f"{craftsman.model!r}", craftsman.name)]
    return found


def check_command(craftsman: Craftsman) -> list[Problem]:
    """argv[0] is on PATH or is an executable file; a sandbox it asks for works here."""
    if craftsman.sandbox == "bwrap":
        why = sandbox.problem()
        if why is not None:
            return [Problem(ERROR, f"craftsman {craftsman.name}: sandbox: bwrap, but {why}",
                            craftsman.name)]
    program = craftsman.argv[0]
    if "/" in program:
        if os.path.isfile(program) and os.access(program, os.X_OK):
            return []
        return [Problem(ERROR, f"craftsman {craftsman.name}: {program} is not an executable "
                        "file; fix argv[0] or install the program", craftsman.name)]
    if shutil.which(program):
        return []
    return [Problem(ERROR, f"craftsman {craftsman.name}: {program} is not on PATH "
                    f"({os.environ.get('PATH', '')}); install it or give argv[0] as a full "
                    "path", craftsman.name)]


def check_openai(craftsman: Craftsman, timeout: float) -> list[Problem]:
    """GET {base_url}/models answers and lists the configured model."""
    url = craftsman.base_url.rstrip("/") + "/models"
    try:
        status, body = fetch_models(url, _api_key(craftsman), timeout)
    except TimeoutError:
        return [_endpoint(craftsman, f"{url} did not answer within {timeout:g} s; some local "
                          "servers (llama-cpp-python) hold /v1/models behind a running "
                          "generation, so retry when it is idle or raise --timeout")]
    except OSError as exc:
        return [_endpoint(craftsman, f"cannot reach {url} ({_reason(exc)}); start the server "
                          "or fix base_url")]
    if status != 200:
        return [_endpoint(craftsman, f"{url} answered HTTP {status} ({_snippet(body)}); check "
                          "base_url and the API key")]
    ids = model_ids(body)
    if ids is None:
        return [_endpoint(craftsman, f"{url} answered something that is not an OpenAI model "
                          f"list ({_snippet(body)}); check base_url (it ends in /v1)")]
    if craftsman.model not in ids:
        listed = ", ".join(ids[:10]) or "none"
        return [_endpoint(craftsman, f"model {craftsman.model!r} is not among the models {url} "
                          f"lists ({listed}); fix `model:` or load the model in the server")]
    return []


def _api_key(craftsman: Craftsman) -> str | None:
    # Only ever sent to this craftsman's own base_url (README: How it keeps its promises).
    return os.environ.get(craftsman.api_key_env) if craftsman.api_key_env else None


def fetch_models(url: str, api_key: str | None, timeout: float) -> tuple[int, str]:
    """The HTTP status and body of GET url; TimeoutError or OSError when there is no answer."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(1 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(1 << 16).decode("utf-8", "replace")
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise exc.reason from None
        raise


def _endpoint(craftsman: Craftsman, message: str) -> Problem:
    return Problem(ERROR, f"craftsman {craftsman.name}: {message}", craftsman.name)


def model_ids(body: str) -> list[str] | None:
    """The model ids of an OpenAI /models answer; None when it is not one."""
    try:
        return [str(item["id"]) for item in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return None


def _reason(exc: OSError) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = getattr(reason, "strerror", None) or str(reason)
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _snippet(text: str) -> str:
    line = " ".join(text.split())
    return (line[:160] + "…") if len(line) > 160 else (line or "empty body")
