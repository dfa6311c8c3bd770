"""Who may do what in a home (PRODUCT.md §2): the mode of every path, and what enforces it.

A home belongs to the workers' user and one group. Members of the group submit (tasks/tmp/ and
tasks/pending/ are group-writable) and read queues, outcomes, the ledger and outputs; only the
workers' user writes outcomes, the ledger and budgets; nobody else can enter the home at all.

Every directory is setgid, so what anyone creates in it belongs to the home's group whatever
their primary group. The two drop directories are also sticky: a member may create files there
but may rename or remove only her own, while the workers' user, the directory's owner, may
claim any of them. A rename needs write access to the directories, not to the file, so the
workers never need to write a member's task file and it is group-readable only.

Modes are given explicitly when a file or directory is made (an os.open mode, then fchmod): the
caller's umask can only take bits away at creation, and changing it (os.umask) is process-wide,
unsafe with threads, so it is never touched.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpoolError, UsageError

OWNER_DIR = 0o2750    # the group enters and lists; only the workers' user writes
# What the processes koubou starts in the home (git, an agent, a verify) create there: the
# group's to read, never others', whatever the caller's umask (set in the child alone).
CHILD_UMASK = 0o027
DROP_DIR = 0o3770     # the group creates files; sticky: each renames or removes only her own
PRIVATE_DIR = 0o700   # config/: the owner's alone
RECORD = 0o640        # every file the product writes, and a member's submitted task
PRIVATE = 0o600       # the config, slot locks, the maintenance lock

# Relative path -> mode, in creation order. "" is the home itself.
LAYOUT: dict[str, int] = {
    "": OWNER_DIR, "config": PRIVATE_DIR, "tasks": OWNER_DIR, "tasks/tmp": DROP_DIR,
    "tasks/pending": DROP_DIR, "tasks/in_progress": OWNER_DIR, "tasks/completed": OWNER_DIR,
    "tasks/failed": OWNER_DIR, "db": OWNER_DIR, "outputs": OWNER_DIR, "run": OWNER_DIR,
    "run/workers": OWNER_DIR,
}
# Directories whose files are all the workers' records: group-readable, exactly RECORD.
RECORD_DIRS = ("tasks/in_progress", "tasks/completed", "tasks/failed", "db", "run/workers")
WHY = {OWNER_DIR: "the group reads, only the workers' user writes, others cannot enter",
       DROP_DIR: "the group submits, each member moves only her own files, others cannot enter",
       PRIVATE_DIR: "the config is the owner's alone",
       RECORD: "the group reads, only the workers' user writes, others nothing"}
SHOWN = 20  # paths named one by one before the rest are counted


# --- making files and directories ----------------------------------------------------------

def open_file(path: str | os.PathLike, flags: int, mode: int = RECORD) -> int:
    """os.open that leaves a file it creates with exactly `mode`, whatever the umask.

    Created with `mode` (the umask can only narrow it, never widen it), then fchmod to `mode`.
    An existing file that is not ours keeps its mode: only its owner may change it.
    """
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    if flags & os.O_EXCL and not mode & _umask():
        return fd  # a new file, and the umask took nothing from its mode: exactly `mode` already
    try:
        os.fchmod(fd, mode)
    except PermissionError:
        pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def _umask() -> int:
    """This process's umask, read where it can be read without changing it (/proc, Linux 4.7+);
    all bits set when it cannot, so every mode is fixed with fchmod. Read once: koubou never
    changes it."""
    global _UMASK
    if _UMASK is None:
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as status:
                line = next(line for line in status if line.startswith("Umask:"))
            _UMASK = int(line.split()[1], 8)
        except (OSError, StopIteration, ValueError, IndexError):
            _UMASK = 0o777
    return _UMASK


_UMASK: int | None = None


def make_dir(path: Path, mode: int, gid: int = -1, parents: bool = False) -> bool:
    """Create a directory with exactly `mode` (with `parents`, missing parents the same way);
    False if it already existed. The group is set before the mode: chmod drops setgid when
    the caller is not in the directory's group."""
    if os.path.isdir(path):
        return False
    if parents and not os.path.isdir(path.parent):
        make_dir(path.parent, mode, gid, parents=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    if gid != -1 and os.stat(path).st_gid != gid:
        os.chown(path, -1, gid)
    os.chmod(path, mode)
    return True


# --- which group ---------------------------------------------------------------------------

def home_gid(home: Path, group: str | None) -> int:
    """The group a home is shared with: --group, else the existing home's, else the owner's
    primary group."""
    if group is not None:
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            if group.isdigit():
                return int(group)
            raise UsageError(f"there is no group {group!r}; create it with `sudo groupadd "
                             f"{group}` and add the members with `sudo usermod -aG {group} "
                             "USER`") from None
    try:
        return os.stat(home).st_gid
    except FileNotFoundError:
        pass
    try:
        return pwd.getpwuid(os.geteuid()).pw_gid
    except KeyError:
        return os.getegid()


def lay_out(home: Path, gid: int) -> list[Path]:
    """Create the directories of LAYOUT that are missing, with their modes; returns them."""
    os.makedirs(home.parent, exist_ok=True)  # outside the home: the caller's usual modes
    made = []
    for relative, mode in LAYOUT.items():
        path = home / relative if relative else home
        try:
            if make_dir(path, mode, gid):
                made.append(path)
        except PermissionError as exc:
            raise SpoolError(_cannot_group(path, gid) if exc.errno == errno.EPERM
                             else denied(path)) from None
    return made


# --- repair (koubou init) and audit (koubou doctor) ----------------------------------------

@dataclass(frozen=True)
class Deviation:
    """A path whose mode or group breaks §2: what it is and what it should be."""

    path: Path
    info: os.stat_result
    mode: int
    gid: int

    def describe(self) -> str:
        """What changes: 'mode 0755 -> 2750, group alice -> koubou'."""
        return ", ".join(f"{name} {have} -> {want}" for name, have, want in self._differences())

    def complaint(self) -> str:
        """What is wrong: 'has mode 0755 and group alice, not 2750 and koubou'."""
        found = self._differences()
        have = " and ".join(f"{name} {value}" for name, value, _ in found)
        return f"has {have}, not {' and '.join(want for _, _, want in found)}"

    def _differences(self) -> list[tuple[str, str, str]]:
        found = []
        have = stat.S_IMODE(self.info.st_mode)
        if have != self.mode:
            found.append(("mode", f"{have:04o}", f"{self.mode:04o}"))
        if self.info.st_gid != self.gid:
            found.append(("group", group_name(self.info.st_gid), group_name(self.gid)))
        return found


def repair(home: Path, group: str | None = None) -> list[str]:
    """Give every path of the home that the workers' user owns its §2 mode and group.

    Returns one line per change. Files that belong to members (tasks they dropped) keep theirs:
    only their owner may change them, and the closed home already keeps others out.
    """
    gid = home_gid(home, group)
    changed = []
    for wrong in deviations(home, gid):
        if wrong.info.st_uid != os.geteuid():
            continue  # a member's file: only she (or root) may change it
        try:
            if wrong.info.st_gid != wrong.gid:
                os.chown(wrong.path, -1, wrong.gid, follow_symlinks=False)
            os.chmod(wrong.path, wrong.mode)
        except FileNotFoundError:
            continue  # finished or purged meanwhile
        except PermissionError:
            raise SpoolError(_cannot_group(wrong.path, wrong.gid)) from None
        changed.append(f"{wrong.path}: {wrong.describe()}")
    return changed


def audit(home: Path) -> list[str]:
    """Sentences naming each path whose mode breaks §2, for `koubou doctor`."""
    if not os.path.isdir(home):
        return []
    info = os.stat(home)
    problems = [_membership(home, info)] if not owner_in_group(info.st_uid, info.st_gid) else []
    found = [w for w in deviations(home, info.st_gid)
             if w.info.st_uid == info.st_uid or _layout_path(home, w.path)]
    for wrong in found[:SHOWN]:
        why = WHY.get(wrong.mode, "never open to others")
        problems.append(f"{wrong.path} {wrong.complaint()} ({why}); `koubou init --home {home}`, "
                        "run as the workers' user, repairs it")
    if len(found) > SHOWN:
        problems.append(f"and {len(found) - SHOWN} more paths like these under {home}; "
                        f"`koubou init --home {home}` repairs them all")
    return problems


def deviations(home: Path, gid: int) -> Iterator[Deviation]:
    """Every path under the home whose mode or group is not what §2 wants; never follows links."""
    for path, info in _walk(home):
        wanted = expected(home, path, info, gid)
        if wanted is not None and (stat.S_IMODE(info.st_mode), info.st_gid) != wanted:
            yield Deviation(path, info, *wanted)


def expected(home: Path, path: Path, info: os.stat_result, gid: int) -> tuple[int, int] | None:
    """(mode, gid) a path should have; None for what §2 says nothing about (links)."""
    if stat.S_ISLNK(info.st_mode):
        return None
    have = stat.S_IMODE(info.st_mode)
    relative = path.relative_to(home).as_posix() if path != home else ""
    if relative in LAYOUT:
        return LAYOUT[relative], gid
    parent = path.parent.relative_to(home).as_posix()
    if stat.S_ISREG(info.st_mode) and parent in RECORD_DIRS:
        return RECORD, gid
    if parent == "config":
        return have & ~0o077, info.st_gid  # the config file: the owner's alone
    return have & ~0o007, info.st_gid  # anything else (outputs, locks, drops): never others'


def _walk(home: Path) -> Iterator[tuple[Path, os.stat_result]]:
    stack = [home]
    while stack:
        directory = stack.pop()
        try:
            yield directory, os.lstat(directory)
            with os.scandir(directory) as entries:
                listed = list(entries)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in listed:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    yield Path(entry.path), entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue


def _layout_path(home: Path, path: Path) -> bool:
    return path == home or path.relative_to(home).as_posix() in LAYOUT


# --- refusing clearly ----------------------------------------------------------------------

def require_entry(home: Path) -> None:
    """SpoolError naming the group to join when this user may not enter the home."""
    try:
        info = os.stat(home)
    except OSError:
        return  # missing: the caller says how to create it
    if stat.S_ISDIR(info.st_mode) and not os.access(home, os.R_OK | os.X_OK):
        raise SpoolError(_refused(home, info, "use"))


def require_submit(home: Path, *directories: Path) -> None:
    """SpoolError, before anything is written, when this user may not submit to the home."""
    for directory in directories:
        if os.access(directory, os.W_OK | os.X_OK):
            continue
        if _read_only_fs(directory):
            raise SpoolError(f"cannot submit to {home}: its file system is mounted read-only; "
                             "submit where the home is writable")
        raise SpoolError(_refused(home, os.stat(home), "submit to"))


def require_owner(home: Path) -> None:
    """SpoolError unless this user owns the home: what init makes and repairs must be the
    workers' user's (even root would leave directories the workers cannot write)."""
    try:
        owner = os.stat(home).st_uid
    except FileNotFoundError:
        return
    if os.geteuid() != owner:
        raise SpoolError(f"only the workers' user {user_name(owner)} may run `koubou init` on "
                         f"{home}; run it as them (`sudo -u {user_name(owner)} koubou init "
                         f"--home {home}`)")


def denied(path: str | os.PathLike) -> str:
    """One sentence for a permission refused on a path in a home: who may, and what to do."""
    target = Path(path)
    for candidate in (target, *target.parents):  # the directory decides who may change it
        try:
            info = os.stat(candidate)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode):
            break
    else:
        return f"permission denied on {target}"
    owner, group = user_name(info.st_uid), group_name(info.st_gid)
    if not in_group(info.st_gid):
        return (f"{user_name(os.geteuid())} may not use {target}: it is open only to the group "
                f"{group}; ask its owner {owner} to run `sudo usermod -aG {group} "
                f"{user_name(os.geteuid())}`, then log in again")
    return (f"{user_name(os.geteuid())} may not change {target}: only the workers' user {owner} "
            f"writes there (members of {group} read and submit); run it as {owner}")


def _refused(home: Path, info: os.stat_result, what: str) -> str:
    group, me = group_name(info.st_gid), user_name(os.geteuid())
    if not in_group(info.st_gid):
        return (f"{me} may not {what} the koubou home {home}: it is shared with the group "
                f"{group} only; ask its owner {user_name(info.st_uid)} to run `sudo usermod "
                f"-aG {group} {me}`, then log in again")
    return (f"{me} may not {what} the koubou home {home}: its modes keep the group {group} "
            f"out; ask its owner {user_name(info.st_uid)} to run `koubou init --home {home}`, "
            "which repairs them")


def _membership(home: Path, info: os.stat_result) -> str:
    owner, group = user_name(info.st_uid), group_name(info.st_gid)
    return (f"the workers' user {owner} is not in the home's group {group}, so it cannot read "
            f"the tasks members submit; run `sudo usermod -aG {group} {owner}` (or give the "
            f"units Group={group}) and restart the workers")


def _cannot_group(path: Path, gid: int) -> str:
    me, group = user_name(os.geteuid()), group_name(gid)
    return (f"{me} cannot give {path} to the group {group}: {me} must own it and be a member; "
            f"run `sudo usermod -aG {group} {me}`, log in again and rerun `koubou init`")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# --- names ---------------------------------------------------------------------------------

def in_group(gid: int) -> bool:
    """Whether this process is in a group (as its own or a supplementary group)."""
    return gid == os.getegid() or gid in os.getgroups()


def owner_in_group(uid: int, gid: int) -> bool:
    """Whether a user belongs to a group (primary or supplementary)."""
    if uid == 0:
        return True  # root reads everything
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return True  # a uid without a name cannot be judged
    return gid in os.getgrouplist(entry.pw_name, entry.pw_gid)


def user_name(uid: int) -> str:
    """A user's name, or the number when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """A group's name, or the number when it has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
