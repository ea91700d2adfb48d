"""Fixed facts of the APR v2 container: magic, sizes, flag bits and the dtype table."""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAGIC = b"APR\x00"
MAGIC_V1 = b"APRN"  # aprender's legacy v1 container (spec: "APR v1 (legacy)")
VERSION_MAJOR = 2
VERSION_MINOR = 0
HEADER_SIZE = 64
ALIGNMENT = 64
FOOTER_SIZE = 4
METADATA_OFFSET = 64
MAX_METADATA_SIZE = 16 * 1024 * 1024
MAX_NAME_LENGTH = 256
MAX_NDIM = 8
# Most elements (product of the non-zero dims) a shape may describe: numpy's limit for 8-byte items.
MAX_ELEMENTS = (2**63 - 1) // 8
# Smallest possible index entry: u16 length, 1-byte name, dtype, ndim=0, offset, size.
MIN_INDEX_ENTRY_SIZE = 2 + 1 + 1 + 1 + 8 + 8


class Flag(enum.IntFlag):
    """Header flag bits (spec: "Flags")."""

    LZ4 = 0x0001
    ZSTD = 0x0002
    ENCRYPTED = 0x0004
    SIGNED = 0x0008
    SHARDED = 0x0010
    QUANTIZED = 0x0020
    HAS_FILTERBANK = 0x0040
    HAS_MODEL_CARD = 0x0080
    STREAMING = 0x0100
    HAS_VOCAB = 0x0200
    LAYOUT_ROW_MAJOR = 0x0400
    LAYOUT_COLUMN_MAJOR = 0x0800


@dataclass(frozen=True)
class DType:
    """One dtype code. Plain dtypes have `itemsize`; packed ones have block sizes."""

    code: int
    name: str
    numpy: str  # numpy dtype of the zero-copy view ("<u2" bits for bf16, "u1" bytes if packed)
    itemsize: int | None = None  # bytes per element, None for packed quantized types
    block_values: int = 1
    block_bytes: int = 0
    header_bytes: int = 0  # q8 stores one f32 scale ahead of its values

    @property
    def packed(self) -> bool:
        return self.itemsize is None

    @property
    def is_float(self) -> bool:
        return self.name in ("f32", "f16", "bf16", "f64")

    def nbytes_for(self, numel: int) -> int:
        """Bytes this dtype needs for `numel` values."""
        if self.itemsize is not None:
            return numel * self.itemsize
        blocks = -(-numel // self.block_values)
        return self.header_bytes + blocks * self.block_bytes


DTYPES: dict[int, DType] = {
    d.code: d
    for d in (
        DType(0, "f32", "<f4", 4),
        DType(1, "f16", "<f2", 2),
        DType(3, "f64", "<f8", 8),
        DType(4, "i32", "<i4", 4),
        DType(5, "i64", "<i8", 8),
        DType(6, "i8", "i1", 1),
        DType(7, "u8", "u1", 1),
        DType(12, "q4_k", "u1", None, block_values=256, block_bytes=144),
        DType(14, "q6_k", "u1", None, block_values=256, block_bytes=210),
        DType(30, "bf16", "<u2", 2),
        DType(128, "q4", "u1", None, block_values=32, block_bytes=18),
        DType(129, "q8", "u1", None, block_values=1, block_bytes=1, header_bytes=4),
    )
}
LEGACY_DTYPE_CODES = {8: 128, 9: 129}  # spec: readers accept 8/9, writers write 128/129
DTYPE_BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES.values()}
QUANTIZED_DTYPES = frozenset(("q4_k", "q6_k", "q4", "q8"))
