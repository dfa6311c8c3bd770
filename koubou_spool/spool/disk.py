"""One file at a time, safely: reading a regular file without following a link or opening a
FIFO, staging a new file whole and durably, and renaming without replacing. The machine's and
the disk's troubles come out as one sentence (Unavailable, NoSpace); spool.files builds the
spool's renames on these."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from . import permissions
from .entries import DISK_ERRNOS, TRANSIENT_ERRNOS, NoSpace, Refused, Unavailable


def read_regular(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes and stat of a regular file of at most `limit` bytes, never following a link or
    opening a FIFO. Refused says why it must not be read (gone=True when it is not there);
    Unavailable when the machine, not the file, is the trouble: read it again later."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Refused("gone", gone=True) from None
    except OSError as exc:
        _raise_if_transient(exc, path)
        if exc.errno == errno.ELOOP:
            raise Refused("a symbolic link; tasks must be regular files") from None
        if exc.errno == errno.ENXIO:
            raise Refused("a FIFO or socket; tasks must be regular files") from None
        if exc.errno == errno.EACCES:
            raise Refused(_unreadable(path)) from None
        raise Refused(f"cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise Refused("a directory; tasks must be regular files")
        if not stat.S_ISREG(info.st_mode):
            raise Refused("not a regular file (FIFO, socket or device)")
        if info.st_size > limit:
            raise Refused(f"{info.st_size} bytes, over spool.max_task_bytes ({limit})")
        data = _read_all(fd, limit + 1)
        if len(data) > limit:
            raise Refused(f"over spool.max_task_bytes ({limit})")
        return data, info
    except OSError as exc:
        _raise_if_transient(exc, path)
        raise Refused(f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def kind_of(path: Path) -> str | None:
    """'file' for a regular file, 'other' for anything else, None when gone; never follows."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    return "file" if stat.S_ISREG(mode) else "other"


def stage(directory: Path, label: str, data: bytes, *, fsync: bool, home: Path) -> str:
    """A new file in `directory` holding `data` (fsynced when asked), for a rename into place;
    NoSpace, and no file left, when the disk under `home` refuses it."""
    # The label only helps a person reading the directory: cut, so a long name fits NAME_MAX.
    path = f"{directory}/.{label[:100]}.{os.getpid()}.{os.urandom(4).hex()}"
    try:
        fd = permissions.open_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions.RECORD)
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise NoSpace.of(exc, home) from None
        raise
    return path


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_SYNC_FILE_RANGE_WRITE = 2


FLUSH_CHUNK = 128  # files open at once in flush_files: far below any descriptor limit


def flush_files(paths: list[str]) -> None:
    """fsync each file, starting the writeback of many of them first.

    On ext4 a new file's blocks are allocated when its data is written back; started for every
    file before the first fsync, the allocations all land in the journal transaction that fsync
    commits, and the later fsyncs find their metadata committed already: one journal commit for
    the lot instead of one a file. FLUSH_CHUNK files at a time, so that a batch of thousands
    never runs out of file descriptors (a normal user's limit is often 1,024)."""
    for start in range(0, len(paths), FLUSH_CHUNK):
        _flush_chunk(paths[start:start + FLUSH_CHUNK])


def _flush_chunk(paths: list[str]) -> None:
    fds = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        if len(fds) > 1 and _sync_file_range is not None:
            for fd in fds:
                _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # a hint: errors are fsync's
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        function = _libc.sync_file_range
    except AttributeError:
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_sync_file_range = _libc_sync_file_range()


def rename_noreplace(source: str | Path, target: str | Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing the target.

    Two submits of one id then queue it once. renameat2 (Linux 3.15+, ext4, xfs, btrfs, tmpfs)
    also keeps the IN_MOVED_TO event workers wait for, which link(2) would not give.
    """
    try:
        renameat2 = _libc.renameat2
    except AttributeError:
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                     _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), str(target))
    # The file system cannot refuse for us: check, then rename (a narrow race for one id).
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, "File exists", str(target))
    os.rename(source, target)


def printable(text: str) -> str:
    """Text safe to write as UTF-8: undecodable bytes of a file name (surrogate escapes)
    become U+FFFD."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "replace").decode("utf-8")


def _raise_if_transient(exc: OSError, path: str) -> None:
    if exc.errno in TRANSIENT_ERRNOS:
        raise Unavailable(f"{path} cannot be read now ({exc.strerror}); it stays where it is "
                          "and is read again later") from None


def _unreadable(path: str) -> str:
    try:
        info = os.lstat(path)
    except OSError:
        return "not readable by the workers' user"
    return (f"not readable by the workers' user (mode {stat.S_IMODE(info.st_mode):04o}, owner "
            f"{permissions.user_name(info.st_uid)}, group {permissions.group_name(info.st_gid)}); "
            "make task files group-readable (umask 027, or chmod g+r before copying them in), "
            "or submit with koubou-submit")


def _read_all(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
