"""Tensor bytes of source files read with pread, one tensor or chunk at a time (never a memory map:
a file cut short by another program while we read it is then a one-line `Truncated` error, not SIGBUS)."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator

from apr_format import AprFile, Flag
from apr_format.errors import from_os_error
from apr_format.fileio import CHUNK, FileRange
from apr_format.integrity import StreamingVerifier
from apr_format.sourceio import read_exact


class SourceFiles:
    """Open files handing out copies of byte ranges. Memory is what the caller holds: one tensor
    for `read()`, one chunk for `chunks()`, whatever the file size."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._closers: list[weakref.finalize] = []

    def open(self, file: str, fd: int | None = None) -> int:
        """Open `file` (once), or take a duplicate of `fd`, an open descriptor of it; returns its size in bytes.

        Raises:
            FileMissing, NotAFile, Unreadable: it cannot be opened.
        """
        if file not in self._fds:
            try:
                self._fds[file] = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if fd is None else os.dup(fd)
            except OSError as exc:
                raise from_os_error(file, exc) from None
            self._closers.append(weakref.finalize(self, os.close, self._fds[file]))  # also if never closed
        return os.fstat(self._fds[file]).st_size

    def fd(self, file: str) -> int:
        """The descriptor of an opened file (for preads of its own)."""
        fd = self._fds.get(file)
        if fd is None:
            raise ValueError(f"{file} is not open")
        return fd

    def read(self, file: str, start: int, nbytes: int) -> memoryview:
        """Bytes start..start+nbytes of an opened file (a copy).

        Raises:
            Truncated: the file ends first (it was cut short while we read it).
        """
        return read_exact(self.fd(file), start, nbytes, file)

    def file_range(self, file: str, start: int, nbytes: int) -> FileRange:
        """Bytes start..start+nbytes of an opened file, for a kernel-side copy through our descriptor."""
        return FileRange(file, start, nbytes, self.fd(file))

    def chunks(self, file: str, start: int, nbytes: int, step: int = CHUNK) -> Iterator[memoryview]:
        """Successive copies of at most `step` bytes: reading a huge tensor costs one chunk of memory."""
        for offset in range(start, start + nbytes, step):
            yield self.read(file, offset, min(step, start + nbytes - offset))

    def close(self) -> None:
        """Close every file."""
        closers, self._fds, self._closers = self._closers, {}, []
        for close in closers:
            close()


class AprStream:
    """Tensor bytes of an open .apr, read with pread one tensor or chunk at a time. zstd files decode
    through AprFile.

    With a `verifier` every byte handed out also feeds the footer CRC-32 (call `verifier.finish()`
    before publishing what was made from them).
    """

    def __init__(self, apr: AprFile, verifier: StreamingVerifier | None = None) -> None:
        self.apr = apr
        self.verifier = verifier
        self._compressed = bool(apr.flags & Flag.ZSTD)
        self._files = SourceFiles()
        if not self._compressed:
            self._files.open(apr.path, apr.fileno())  # the file `apr` parsed, even if its path was replaced

    def stream(self, name: str) -> memoryview:
        """The tensor's decoded bytes (a copy)."""
        if self._compressed:
            self._feed_stored(name)
            return self.apr.raw(name)
        file, start, nbytes = self._range(name)
        view = self._files.read(file, start, nbytes)
        if self.verifier is not None:
            self.verifier.feed(start, view)
        return view

    def file_range(self, name: str) -> FileRange | None:
        """Where the tensor's bytes lie in the file, for a kernel-side copy (None when zstd-compressed).
        The verifier reads the range first (the copy then finds it in the page cache)."""
        if self._compressed:
            return None
        file, start, nbytes = self._range(name)
        if self.verifier is not None:
            self.verifier.read_to(start + nbytes)
        return self._files.file_range(file, start, nbytes)

    def chunks(self, name: str, step: int = CHUNK) -> Iterator[memoryview]:
        """The tensor's decoded bytes in chunks of `step`."""
        if self._compressed:
            self._feed_stored(name)
            raw = self.apr.raw(name)
            for offset in range(0, len(raw), step):
                yield raw[offset : offset + step]
            return
        file, start, nbytes = self._range(name)
        offset = start
        for chunk in self._files.chunks(file, start, nbytes, step):
            if self.verifier is not None:
                self.verifier.feed(offset, chunk)
            offset += len(chunk)
            yield chunk

    def _feed_stored(self, name: str) -> None:
        if self.verifier is not None:
            self.verifier.feed(self.apr.header.data_offset + self.apr.info(name).offset, self.apr.stored(name))

    def _range(self, name: str) -> tuple[str, int, int]:
        info = self.apr.info(name)
        return self.apr.path, self.apr.header.data_offset + info.offset, info.size

    def close(self) -> None:
        """Close our file (the AprFile stays open)."""
        self._files.close()

