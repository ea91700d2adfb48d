"""Temp files and folders beside a destination: created under a lock, and the leftovers of dead writers removed.

A writer holds an exclusive `flock` on its temp file (or folder) until it is renamed into place. The
kernel drops the lock when the writer exits, however it exits (kill -9 included), so a temp that
nobody holds a lock on was left by a writer that died: `remove_stale` deletes those, and only
those matching our exact name pattern `.{destination name}.{8 random chars}.apr-tmp`.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: nothing is locked, so nothing is judged stale
    fcntl = None

SUFFIX = ".apr-tmp"
_RANDOM_PART = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkstemp puts between prefix and suffix


def temp_prefix(dest: str | os.PathLike) -> str:
    """The name prefix of `dest`'s temp files: `.model.apr.` for `model.apr`."""
    return f".{os.path.basename(os.fspath(dest))}."


def is_temp_name(name: str, dest: str | os.PathLike) -> bool:
    """Whether `name` (a file name, no folder) has the exact form of a temp file of `dest`."""
    prefix = temp_prefix(dest)
    if not (name.startswith(prefix) and name.endswith(SUFFIX)):
        return False
    return bool(_RANDOM_PART.fullmatch(name[len(prefix) : -len(SUFFIX)]))


def create_temp(dest: str | os.PathLike) -> tuple[int, str]:
    """A new, locked temp file in `dest`'s folder: (fd open for writing, path).

    The lock lasts while the fd, or a `dup` of it, stays open.

    Raises:
        OSError: the folder is missing or not writable; `filename` is `dest`.
    """
    return _create_locked(os.fspath(dest), _new_file)


def create_temp_dir(dest: str | os.PathLike) -> tuple[int, str]:
    """A new, locked temp folder in `dest`'s parent folder: (fd holding the lock, path). Like `create_temp`."""
    return _create_locked(os.fspath(dest), _new_dir)


def _new_file(dest: str) -> tuple[int, str]:
    folder = os.path.dirname(os.path.abspath(dest))
    return tempfile.mkstemp(prefix=temp_prefix(dest), suffix=SUFFIX, dir=folder)


def _new_dir(dest: str) -> tuple[int, str]:
    path = tempfile.mkdtemp(prefix=temp_prefix(dest), suffix=SUFFIX, dir=os.path.dirname(os.path.abspath(dest)))
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY), path
    except OSError:
        os.rmdir(path)
        raise


def _create_locked(dest: str, make: Callable[[str], tuple[int, str]]) -> tuple[int, str]:
    while True:
        try:
            fd, tmp = make(dest)
        except OSError as exc:
            raise type(exc)(exc.errno, exc.strerror, dest) from None
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleaner may have taken the unlocked name between its creation and flock
            if os.path.samestat(os.fstat(fd), os.stat(tmp, follow_symlinks=False)):
                return fd, tmp
        except FileNotFoundError:
            pass
        os.close(fd)


def live_writers(dest: str | os.PathLike) -> list[int | None]:
    """The PIDs of the processes writing `dest` right now (holding the lock on one of its temps);
    None for a writer whose PID the kernel does not tell (no /proc/locks)."""
    if fcntl is None:
        return []
    folder = os.path.dirname(os.path.abspath(os.fspath(dest)))
    try:
        names = [n for n in os.listdir(folder) if is_temp_name(n, dest)]
    except OSError:
        return []
    pids = []
    for name in names:
        try:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not try_lock(fd):
                pids.append(lock_holder(fd))
        finally:
            os.close(fd)
    return pids


def lock(fd: int) -> None:
    """Take the exclusive flock on `fd`, waiting for any other holder."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)


def try_lock(fd: int) -> bool:
    """Take the exclusive flock on `fd` without waiting; False when another open file holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def lock_holder(fd: int) -> int | None:
    """The PID holding a flock on the file open as `fd`, from /proc/locks (None where unknown)."""
    info = os.fstat(fd)
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 2345 fe:00:260072 0 EOF"; waiters have "->" after "1:"
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
            return int(fields[4])
    return None


def remove_stale(dest: str | os.PathLike) -> list[str]:
    """Delete `dest`'s temp files and folders that no living writer holds; returns their paths.

    Only regular files and folders of ours (same owner) with the exact temp-name pattern are
    considered; anything unreadable or locked is left alone.
    """
    if fcntl is None:
        return []
    folder = os.path.dirname(os.path.abspath(os.fspath(dest)))
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    removed = []
    for name in names:
        if is_temp_name(name, dest):
            path = os.path.join(folder, name)
            if _remove_if_unlocked(path):
                removed.append(path)
    return removed


def _remove_if_unlocked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(fd)
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)) or info.st_uid != os.geteuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held by a live writer
            return False
        if not os.path.samestat(info, os.stat(path, follow_symlinks=False)):  # renamed meanwhile
            return False
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
