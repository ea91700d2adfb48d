"""Reading files another program may cut short meanwhile: exact preads that fail with `Truncated`
(a memory map would kill the process with SIGBUS instead), and whether mmap is safe for a path."""

from __future__ import annotations

import functools
import os

import numpy as np

from .errors import Truncated

# File system types (as /proc/self/mountinfo names them) where another machine can change a file
# under our mapping, or where mmap page faults are network round trips.
NETWORK_FS = frozenset((
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "ocfs2", "gfs2", "fuse", "fuseblk", "virtiofs", "orangefs", "davfs",
))


def read_exact(fd: int, offset: int, nbytes: int, path: str) -> memoryview:
    """`nbytes` bytes of the open file `fd` from `offset`, read with pread into new writable memory
    (numpy.empty: not zero-filled first, which would cost as much as the read itself).

    Raises:
        Truncated: the file ends first (it was cut short by another program while we read it).
    """
    buf = memoryview(np.empty(nbytes, dtype=np.uint8))
    read_into(fd, offset, buf, path)
    return buf


def read_into(fd: int, offset: int, buf: memoryview, path: str) -> None:
    """Fill `buf` from the open file `fd` at `offset` (pread, retried until full).

    Raises:
        Truncated: the file ends before `buf` is full.
    """
    done, total = 0, len(buf)
    while done < total:
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:  # EIO, EISDIR (a folder opens fine): name the file
            raise type(exc)(exc.errno, exc.strerror, path) from None
        if n == 0:
            raise Truncated(path, f"file ended at byte {offset + done} while reading bytes "
                                  f"{offset}..{offset + total} (was it cut short by another program?)")
        done += n


def check_size(fd: int, expected: int, path: str) -> None:
    """Raise Truncated when the open file is now shorter than `expected` bytes (it shrank since we opened it)."""
    size = os.fstat(fd).st_size
    if size < expected:
        raise Truncated(path, f"file shrank from {expected} to {size} bytes while open "
                              "(another program is changing it)")


def on_network_fs(path: str | os.PathLike, mounts: tuple[tuple[str, str], ...] | None = None) -> bool:
    """Whether `path` lies on a network or FUSE file system, per `mounts` ((mount point, type) pairs;
    default: /proc/self/mountinfo). False where unknown."""
    mounts = _mounts() if mounts is None else mounts
    if not mounts:
        return False
    real = os.path.realpath(os.fspath(path))
    best, fstype = "", ""
    for point, kind in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    return fstype.split(".")[0] in NETWORK_FS


def mmap_is_safe(path: str | os.PathLike) -> bool:
    """The default for `use_mmap=None`: map local files, read network ones; never map when the
    environment sets APR_NO_MMAP=1 (for a file system the table above misses)."""
    if os.environ.get("APR_NO_MMAP", "") not in ("", "0"):
        return False
    return not on_network_fs(path)


@functools.cache
def _mounts() -> tuple[tuple[str, str], ...]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return parse_mountinfo(fh.read())
    except OSError:
        return ()


def parse_mountinfo(text: str) -> tuple[tuple[str, str], ...]:
    """(mount point, file system type) of every line of a /proc/PID/mountinfo text."""
    lines = text.splitlines()
    out = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and tail:
            out.append((_unescape(fields[4]), tail[0]))
    return tuple(out)


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
