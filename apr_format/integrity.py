"""The footer CRC-32 checked while a reader streams a file's bytes: one helper for every command that reads them all."""

from __future__ import annotations

import os
import struct

from .constants import FOOTER_SIZE
from .errors import FooterChecksum
from .fileio import CHUNK, crc32


class StreamingVerifier:
    """Continues the footer CRC-32 over the bytes a reader consumes anyway, so a command that reads
    every tensor checks the checksum without a second pass over the file.

    Feed it what you read, in file order (`feed`), or let it read a range itself (`read_to`: for a
    kernel-side copy, the bytes then come from the page cache the copy warms). Bytes fed twice or out
    of order are ignored; bytes skipped (padding, tensors nobody read) are read by the next `feed`
    or by `finish`. Call `finish()` before publishing anything made from the bytes:

        with open_apr(path) as f:
            check = StreamingVerifier(f)
            for info in f.tensors():
                check.feed(f.header.data_offset + info.offset, f.stored(info.name))
                ...
            check.finish()  # raises FooterChecksum on a mismatch
    """

    def __init__(self, apr, hint: str = "") -> None:
        """`apr` is an open AprFile; `hint` is appended to the mismatch message (e.g. the override flag)."""
        self.path = apr.path
        self.hint = hint
        self.trailing = apr.trailing_bytes
        self.body = apr.file_size - FOOTER_SIZE
        self._crc = 0
        self._pos = 0
        self._fd = os.dup(apr.fileno())  # the file `apr` parsed, even if its path was replaced since

    @property
    def position(self) -> int:
        """Bytes 0..position have been counted."""
        return self._pos

    def feed(self, start: int, data: bytes | bytearray | memoryview) -> None:
        """`data` are the file's bytes from absolute offset `start` on (a tensor or part of one)."""
        end = min(start + len(data), self.body)
        if end <= self._pos:
            return
        if start > self._pos:
            self.read_to(start)
        self._crc = crc32(memoryview(data)[self._pos - start : end - start], self._crc)
        self._pos = end

    def read_to(self, end: int) -> None:
        """Count bytes position..end by reading them (bounded memory: one CHUNK at a time)."""
        end = min(end, self.body)
        while self._pos < end:
            block = os.pread(self._fd, min(CHUNK, end - self._pos), self._pos)
            if not block:  # the file shrank under us: the CRC cannot match
                break
            self._crc = crc32(block, self._crc)
            self._pos += len(block)

    def finish(self) -> None:
        """Count the rest of the file and compare with the footer; closes the verifier.

        Raises:
            FooterChecksum: the stored CRC-32 does not match the bytes.
        """
        try:
            self.read_to(self.body)
            (stored,) = struct.unpack("<I", os.pread(self._fd, FOOTER_SIZE, self.body).rjust(FOOTER_SIZE, b"\0"))
        finally:
            self.close()
        if self._crc != stored:
            raise FooterChecksum(self.path, footer_mismatch(stored, self._crc, self.trailing, self.hint))

    def close(self) -> None:
        """Release the file descriptor (finish() does it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def footer_mismatch(stored: int, computed: int, trailing: int = 0, hint: str = "") -> str:
    """The one wording of a footer CRC mismatch (reader, verifier and `apr validate` share it)."""
    text = f"footer CRC-32 mismatch: stored {stored:#010x}, computed {computed:#010x}: the file is corrupt"
    if trailing:
        text += f" ({trailing} bytes follow the last tensor: something was appended to the file)"
    return f"{text}; {hint}" if hint else text
