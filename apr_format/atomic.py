"""Replace a file or folder all at once: everything is written to a locked temp beside it, made
durable, then renamed into place. A failure (or a kill) at any moment leaves the destination as it was;
the temps of dead writers are removed by the next write of the same destination (see `tempfiles`).

Without `overwrite` the publish is no-clobber (renameat2 RENAME_NOREPLACE, or link(2) of the finished
temp): of two processes writing one destination exactly one succeeds, the other gets `OutputExists`
naming the living writer's PID. With it, the last complete write wins."""

from __future__ import annotations

import errno
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from . import tempfiles
from .errors import OutputExists

# Errors of a write that mention no file (a full disk, a read-only mount): they are the destination's.
_DESTINATION_ERRNOS = frozenset((errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS))
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
# renameat2 flags this kernel or file system does not support; link(2) unsupported on this file system.
_UNSUPPORTED = frozenset((errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP))
_NO_LINKS = frozenset((errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK))
_TAKEN = frozenset((errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR))
_AT_FDCWD = -100


@contextmanager
def replacing(dest: str | os.PathLike, buffering: int = 1 << 20, *, overwrite: bool = True) -> Iterator[BinaryIO]:
    """A binary file to fill; on a clean exit it is fsynced and renamed over `dest`.

    With `overwrite` False an existing `dest` is never replaced (see the module docstring).

    Raises:
        OSError: naming `dest`, never the temp file, when the folder is not writable or the disk fills.
        OutputExists: (`overwrite` False) `dest` exists, or appeared meanwhile, or another process writes it.
    """
    dest = os.fspath(dest)
    with _temp_for(dest, tempfiles.create_temp, _unlink, overwrite) as (lock, tmp):
        with os.fdopen(os.dup(lock), "w+b", buffering=buffering) as out:
            os.fchmod(out.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; look like any new file
            yield out
            out.flush()
            os.fsync(out.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            _publish_new_file(tmp, dest)


@contextmanager
def replacing_folder(dest: str | os.PathLike, *, overwrite: bool = True) -> Iterator[str]:
    """A new folder to fill; on a clean exit it takes `dest`'s place (an old `dest` is removed).

    Where the kernel can exchange two names at once (Linux renameat2), `dest` is at every instant the
    old folder or the new one; elsewhere there is a moment between two renames when it is absent.
    With `overwrite` False only a missing or empty `dest` folder is replaced.

    Raises:
        OutputExists: (`overwrite` False) `dest` is not an empty folder, or another process writes it.
    """
    dest = os.fspath(dest)
    with _temp_for(dest, tempfiles.create_temp_dir, _rmtree, overwrite) as (_, tmp):
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _fsync_dir(tmp)
        _swap_into_place(tmp, dest, overwrite)


def link_into_place(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Make `dest` a hard link to `src`, replacing any old `dest` at once.

    Raises:
        OSError: the file system has no hard links (then copy instead), or `src` is missing.
    """
    dest = os.fspath(dest)
    with _temp_for(dest, tempfiles.create_temp, _unlink) as (_, tmp):  # a temp name the stale policy knows
        os.unlink(tmp)
        held = os.open(src, os.O_RDONLY)
        try:  # the link under the temp name is src's inode: lock it, or another writer's cleanup deletes it
            tempfiles.lock(held)
            os.link(src, tmp)
            os.replace(tmp, dest)
            _unlink(tmp)  # rename(2) does nothing when dest already is a link to the same file
        finally:
            os.close(held)


def claim_folder(folder: str | os.PathLike) -> int:
    """Make `folder` (and its parents) if needed and take the exclusive lock on it for this process:
    one writer per run folder. Returns the fd holding the lock (closing it, or exiting, releases it).

    Raises:
        OutputExists: another process holds the folder (its PID named where the kernel tells it).
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    if tempfiles.try_lock(fd):
        return fd
    holder = tempfiles.lock_holder(fd)
    os.close(fd)
    raise OutputExists(folder, f"is in use by another process ({_pids([holder])}); wait for it or choose another folder")


@contextmanager
def _temp_for(
    dest: str, create: Callable[[str], tuple[int, str]], discard: Callable[[str], None], overwrite: bool = True,
) -> Iterator[tuple[int, str]]:
    """A locked temp beside `dest` (dead writers' temps removed first): (lock fd, path). The block puts
    it in place; on any error it is discarded and OSErrors name `dest`. The folder is fsynced after.
    Without `overwrite`, an existing `dest` (other than an empty folder) or a living writer of it is refused first."""
    tempfiles.remove_stale(dest)
    if not overwrite:
        _refuse_taken(dest)
    lock, tmp = create(dest)
    try:
        yield lock, tmp
    except OSError as exc:
        discard(tmp)
        raise _naming(exc, tmp, dest) from exc
    except BaseException:
        discard(tmp)
        raise
    finally:
        os.close(lock)
    _fsync_dir(os.path.dirname(os.path.abspath(dest)))


def _refuse_taken(dest: str) -> None:
    if os.path.lexists(dest) and not _empty_folder(dest):
        raise OutputExists(dest, "already exists (use --force to overwrite)")
    writers = tempfiles.live_writers(dest)
    if writers:
        raise OutputExists(dest, f"already exists or is being written: another process ({_pids(writers)}) is "
                                 "writing it now (use --force to overwrite)")


def _publish_new_file(tmp: str, dest: str) -> None:
    """Rename `tmp` to `dest` unless `dest` exists by now: one step where the kernel can, else link + unlink."""
    try:
        if _renameat2(tmp, dest, _RENAME_NOREPLACE):
            return
        try:
            os.link(tmp, dest)
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            if os.path.lexists(dest):  # no hard links here either: the check and the rename are two steps
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dest) from None
            os.rename(tmp, dest)
            return
        os.unlink(tmp)
    except FileExistsError:
        raise _appeared(dest) from None


def _appeared(dest: str) -> OutputExists:
    return OutputExists(dest, "already exists: another process wrote it while this one was writing "
                              "(use --force to overwrite)")


def _pids(pids: list[int | None]) -> str:
    known = sorted({p for p in pids if p is not None})
    return ", ".join(f"PID {p}" for p in known) if known else "PID unknown"


def _empty_folder(path: str) -> bool:
    try:
        return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    except OSError:
        return False


def _swap_into_place(tmp: str, dest: str, overwrite: bool = True) -> None:
    """Rename folder `tmp` to `dest`; an old `dest` ends up at `tmp`'s name and is then removed.
    Without `overwrite` only a missing or empty `dest` is replaced (rename(2) does that in one step)."""
    try:
        os.rename(tmp, dest)
        return
    except OSError as exc:
        if exc.errno not in _TAKEN:
            raise
        if not overwrite:
            raise _appeared(dest) from None
    if not exchange(tmp, dest):
        aside_lock, aside = tempfiles.create_temp_dir(dest)
        try:
            os.rename(dest, aside)  # replaces the empty, locked folder just made
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(aside, dest)
                raise
        finally:
            os.close(aside_lock)
        tmp = aside
    shutil.rmtree(tmp, ignore_errors=True)


def exchange(a: str, b: str) -> bool:
    """Swap the names `a` and `b` in one step; False where this kernel or file system cannot."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _renameat2(a: str, b: str, flags: int) -> bool:
    """renameat2(a, b, flags); False where this kernel or file system lacks it or the flag.

    Raises:
        OSError: any other failure (FileExistsError for RENAME_NOREPLACE onto an existing `b`).
    """
    import ctypes  # here, not at import time: `apr inspect` never needs it

    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), b)


@functools.cache
def _libc():
    """The C library's symbols (ctypes.CDLL), or None."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to load symbols from
        return None


def _naming(exc: OSError, tmp: str, dest: str) -> OSError:
    """`exc` naming `dest` when it named our temp (or a file inside it) or nothing at all."""
    name = exc.filename
    if (name is None and exc.errno in _DESTINATION_ERRNOS) or (name is not None and os.fspath(name).startswith(tmp)):
        return type(exc)(exc.errno, exc.strerror, dest)
    return exc


def _fsync_dir(folder: str) -> None:
    """Make a folder's entries (a rename into it) durable.

    Raises:
        OSError: naming `folder` when it cannot be opened or synced: the rename could be lost in a crash.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot make a rename in this folder durable (fsync: {exc.strerror})",
                        folder) from exc


def _rmtree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

