"""Read-only memory maps handing out zero-copy views, dropping each streamed range's pages after use."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

from apr_format import AprFile, Flag
from apr_format.fileio import CHUNK, FileRange, release_pages
from apr_format.integrity import StreamingVerifier



class MappedFiles:
    """mmaps of several files. `stream()` releases the pages of the range it handed out before
    (they stay in the page cache), so one pass over every tensor keeps RSS near the largest
    tensor instead of the file size."""

    def __init__(self) -> None:
        self._maps: dict[str, mmap.mmap] = {}
        self._views: dict[str, memoryview] = {}
        self._streamed: tuple[str, int, int] | None = None

    def open(self, file: str) -> memoryview:
        """Map `file` (once) and return a view of all of it; empty for an empty file."""
        if file not in self._views:
            with open(file, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    return memoryview(b"")
                self._maps[file] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._views[file] = memoryview(self._maps[file])
        return self._views[file]

    def view(self, file: str, start: int, nbytes: int) -> memoryview:
        """Bytes start..start+nbytes of a mapped file, zero-copy."""
        view = self._views.get(file)
        if view is None:
            raise ValueError(f"{file} is not mapped")
        return view[start : start + nbytes]

    def stream(self, file: str, start: int, nbytes: int) -> memoryview:
        """`view()`, first dropping the previously streamed range's pages from this process."""
        previous, self._streamed = self._streamed, (file, start, nbytes)
        if previous is not None and previous != self._streamed:
            self.drop(*previous)
        return self.view(file, start, nbytes)

    def chunks(self, file: str, start: int, nbytes: int, step: int = CHUNK) -> Iterator[memoryview]:
        """Successive views of at most `step` bytes; each chunk's pages are released once the
        caller asks for the next, so reading a huge tensor costs one chunk of RSS."""
        for offset in range(start, start + nbytes, step):
            size = min(step, start + nbytes - offset)
            yield self.view(file, offset, size)
            self.drop(file, offset, size)

    def drop(self, file: str, start: int, nbytes: int) -> None:
        """Release a range's pages from this process (a later read faults them back in)."""
        mapping = self._maps.get(file)
        if mapping is not None:
            release_pages(mapping, start, nbytes)

    def close(self) -> None:
        """Unmap everything (left to the garbage collector while views are still alive)."""
        for view in self._views.values():
            try:
                view.release()
            except BufferError:
                pass
        for mapping in self._maps.values():
            try:
                mapping.close()
            except BufferError:
                pass
        self._views, self._maps, self._streamed = {}, {}, None


class AprStream:
    """Tensor bytes of an open .apr through our own mapping, so each tensor's pages can be released
    after use (AprFile keeps everything it touched resident). zstd files decode through AprFile.

    With a `verifier` every byte handed out also feeds the footer CRC-32 (call `verifier.finish()`
    before publishing what was made from them).
    """

    def __init__(self, apr: AprFile, verifier: StreamingVerifier | None = None) -> None:
        self.apr = apr
        self.verifier = verifier
        self._compressed = bool(apr.flags & Flag.ZSTD)
        self._mapped = MappedFiles()
        if not self._compressed:
            self._mapped.open(apr.path)

    def stream(self, name: str) -> memoryview:
        """The tensor's decoded bytes; the previously streamed tensor's pages are released."""
        if self._compressed:
            self._feed_stored(name)
            return self.apr.raw(name)
        view = self._mapped.stream(*self._range(name))
        if self.verifier is not None:
            self.verifier.feed(self._range(name)[1], view)
        return view

    def file_range(self, name: str) -> FileRange | None:
        """Where the tensor's bytes lie in the file, for a kernel-side copy (None when zstd-compressed).
        The verifier reads the range first (the copy then finds it in the page cache)."""
        if self._compressed:
            return None
        file, start, nbytes = self._range(name)
        if self.verifier is not None:
            self.verifier.read_to(start + nbytes)
        return FileRange(file, start, nbytes)

    def chunks(self, name: str, step: int = CHUNK) -> Iterator[memoryview]:
        """The tensor's decoded bytes in chunks of `step`, pages released as it goes."""
        if self._compressed:
            self._feed_stored(name)
            raw = self.apr.raw(name)
            for offset in range(0, len(raw), step):
                yield raw[offset : offset + step]
            return
        file, start, nbytes = self._range(name)
        offset = start
        for chunk in self._mapped.chunks(file, start, nbytes, step):
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
        """Unmap (the AprFile stays open)."""
        self._mapped.close()
