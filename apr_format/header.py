"""The 64-byte APR v2 header: packing, unpacking and its checks."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

from .constants import HEADER_SIZE, MAGIC, MAGIC_V1, METADATA_OFFSET, VERSION_MAJOR, VERSION_MINOR, Flag
from .sniff import describe, identify_bytes
from .errors import BadMagic, ColumnMajor, HeaderChecksum, LegacyFormat, Truncated, UnsupportedFeature, UnsupportedVersion

# magic, major, minor, flags, tensor_count, metadata_offset, metadata_size,
# tensor_index_offset, data_offset, checksum (spec: "Header (64 bytes)")
_LAYOUT = struct.Struct("<4sBBHIQIQQI")
_CHECKSUM_AT = 40


@dataclass(frozen=True)
class Header:
    """Decoded header fields; `checksum` is the stored value."""

    flags: int
    tensor_count: int
    metadata_size: int
    tensor_index_offset: int
    data_offset: int
    metadata_offset: int = METADATA_OFFSET
    version_major: int = VERSION_MAJOR
    version_minor: int = VERSION_MINOR
    checksum: int = 0

    def pack(self) -> bytes:
        """64 bytes with the checksum computed over bytes 0..40 and 44..64."""
        raw = bytearray(HEADER_SIZE)
        _LAYOUT.pack_into(
            raw, 0, MAGIC, self.version_major, self.version_minor, self.flags,
            self.tensor_count, self.metadata_offset, self.metadata_size,
            self.tensor_index_offset, self.data_offset, 0,
        )
        struct.pack_into("<I", raw, _CHECKSUM_AT, header_checksum(raw))
        return bytes(raw)


def header_checksum(raw: bytes | bytearray | memoryview) -> int:
    """CRC-32 of the header without its own checksum field."""
    return zlib.crc32(raw[_CHECKSUM_AT + 4 : HEADER_SIZE], zlib.crc32(raw[:_CHECKSUM_AT]))


def unpack_header(raw: bytes | memoryview, path: str | os.PathLike) -> Header:
    """Parse and check magic, version, checksum and layout flags.

    Raises:
        BadMagic, LegacyFormat, Truncated, UnsupportedVersion, HeaderChecksum,
        ColumnMajor, UnsupportedFeature.
    """
    magic = bytes(raw[:4])
    if magic == MAGIC_V1:
        raise LegacyFormat(path, "APR v1 file (magic 'APRN'); only APR v2 is supported, re-save it with a current aprender")
    if len(raw) < 4 or magic != MAGIC:
        raise BadMagic(path, not_apr_problem(identify_bytes(bytes(raw))))
    if len(raw) < HEADER_SIZE:
        raise Truncated(path, f"file is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header")
    fields = _LAYOUT.unpack_from(raw, 0)
    _, major, minor, flags, count, meta_off, meta_size, index_off, data_off, stored = fields
    if major != VERSION_MAJOR:
        raise UnsupportedVersion(path, f"APR version {major}.{minor} is not supported (expected {VERSION_MAJOR}.x)")
    actual = header_checksum(raw[:HEADER_SIZE])
    if actual != stored:
        raise HeaderChecksum(path, f"header checksum mismatch: stored {stored:#010x}, computed {actual:#010x}")
    if flags & Flag.LAYOUT_COLUMN_MAJOR:
        raise ColumnMajor(path, "LAYOUT_COLUMN_MAJOR flag is set; column-major files are forbidden")
    for bit, what in ((Flag.ENCRYPTED, "encrypted"), (Flag.LZ4, "LZ4-compressed")):
        if flags & bit:
            raise UnsupportedFeature(path, f"{what} payloads are not supported")
    return Header(
        flags=flags, tensor_count=count, metadata_size=meta_size, tensor_index_offset=index_off,
        data_offset=data_off, metadata_offset=meta_off, version_major=major,
        version_minor=minor, checksum=stored,
    )


def not_apr_problem(kind: str) -> str:
    """The message for a file of another `kind` (see sniff.KINDS) where an .apr was expected."""
    convertible = kind in ("gguf", "safetensors", "hf-folder")
    hint = " (`apr convert` turns it into one)" if convertible else ""
    return f"is {describe(kind)}, not an APR file{hint}"
