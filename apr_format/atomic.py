"""Replace a file or folder all at once: everything is written to a locked temp beside it, made
durable, then renamed into place. A failure (or a kill) at any moment leaves the destination as it was;
the temps of dead writers are removed by the next write of the same destination (see `tempfiles`)."""

from __future__ import annotations

import errno
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

from . import tempfiles

# Errors of a write that mention no file (a full disk, a read-only mount): they are the destination's.
_DESTINATION_ERRNOS = frozenset((errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS))
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


@contextmanager
def replacing(dest: str | os.PathLike, buffering: int = 1 << 20) -> Iterator[BinaryIO]:
    """A binary file to fill; on a clean exit it is fsynced and renamed over `dest`.

    Raises:
        OSError: naming `dest`, never the temp file, when the folder is not writable or the disk fills.
    """
    dest = os.fspath(dest)
    with _temp_for(dest, tempfiles.create_temp, _unlink) as (lock, tmp):
        with os.fdopen(os.dup(lock), "w+b", buffering=buffering) as out:
            os.fchmod(out.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600; look like any new file
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)


@contextmanager
def replacing_folder(dest: str | os.PathLike) -> Iterator[str]:
    """A new folder to fill; on a clean exit it takes `dest`'s place (an old `dest` is removed).

    Where the kernel can exchange two names at once (Linux renameat2), `dest` is at every instant the
    old folder or the new one; elsewhere there is a moment between two renames when it is absent.
    """
    dest = os.fspath(dest)
    with _temp_for(dest, tempfiles.create_temp_dir, _rmtree) as (_, tmp):
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        _fsync_dir(tmp)
        _swap_into_place(tmp, dest)


def link_into_place(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Make `dest` a hard link to `src`, replacing any old `dest` at once.

    Raises:
        OSError: the file system has no hard links (then copy instead), or `src` is missing.
    """
    dest = os.fspath(dest)
    with _temp_for(dest, tempfiles.create_temp, _unlink) as (_, tmp):  # a temp name the stale policy knows
        os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dest)


@contextmanager
def _temp_for(
    dest: str, create: Callable[[str], tuple[int, str]], discard: Callable[[str], None],
) -> Iterator[tuple[int, str]]:
    """A locked temp beside `dest` (dead writers' temps removed first): (lock fd, path). The block puts
    it in place; on any error it is discarded and OSErrors name `dest`. The folder is fsynced after."""
    tempfiles.remove_stale(dest)
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


def _swap_into_place(tmp: str, dest: str) -> None:
    """Rename folder `tmp` to `dest`; an old `dest` ends up at `tmp`'s name and is then removed."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
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
    import ctypes  # here, not at import time: `apr inspect` never needs it

    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
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

