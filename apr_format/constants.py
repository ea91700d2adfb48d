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


def index_entry_size(name: str, ndim: int) -> int:
    """Bytes of one tensor index entry: u16 name length, name, dtype, ndim, u64 dims, offset, size."""
    return 2 + len(name.encode("utf-8")) + 1 + 1 + 8 * ndim + 8 + 8


MIN_INDEX_ENTRY_SIZE = index_entry_size("x", 0)  # a 1-byte name and no dims


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
    """Every fact about one dtype code. Plain dtypes have `itemsize`; packed (quantized) ones block sizes."""

    code: int
    name: str
    numpy: str  # numpy dtype of the zero-copy view ("<u2" bits for bf16, "u1" bytes if packed)
    itemsize: int | None = None  # bytes per element, None for packed quantized types
    block_values: int = 1
    block_bytes: int = 0
    header_bytes: int = 0  # q8 stores one f32 scale ahead of its values
    torch: str | None = None  # torch attribute, numpy `dtype.name` and HF `torch_dtype` ("bfloat16")
    safetensors: str | None = None  # safetensors header dtype ("BF16")
    gguf: str | None = None  # GGML type name whose bytes are identical ("Q4_K")
    is_float: bool = False

    @property
    def packed(self) -> bool:
        """Quantized in blocks: no per-element item size (q4, q8, q4_k, q6_k)."""
        return self.itemsize is None

    quantized = packed

    def to_torch(self):
        """The torch dtype (torch is imported here, never at module level).

        Raises:
            UnknownDType: a packed dtype, which torch cannot view.
        """
        if self.torch is None:
            from .errors import UnknownDType

            raise UnknownDType(None, f"dtype {self.name} has no torch equivalent (dequantize it first)")
        import torch

        return getattr(torch, self.torch)

    def nbytes_for(self, numel: int) -> int:
        """Bytes this dtype needs for `numel` values."""
        if self.itemsize is not None:
            return numel * self.itemsize
        blocks = -(-numel // self.block_values)
        return self.header_bytes + blocks * self.block_bytes


DTYPES: dict[int, DType] = {
    d.code: d
    for d in (
        DType(0, "f32", "<f4", 4, torch="float32", safetensors="F32", gguf="F32", is_float=True),
        DType(1, "f16", "<f2", 2, torch="float16", safetensors="F16", gguf="F16", is_float=True),
        DType(3, "f64", "<f8", 8, torch="float64", safetensors="F64", gguf="F64", is_float=True),
        DType(4, "i32", "<i4", 4, torch="int32", safetensors="I32", gguf="I32"),
        DType(5, "i64", "<i8", 8, torch="int64", safetensors="I64", gguf="I64"),
        DType(6, "i8", "i1", 1, torch="int8", safetensors="I8", gguf="I8"),
        DType(7, "u8", "u1", 1, torch="uint8", safetensors="U8"),
        DType(12, "q4_k", "u1", None, block_values=256, block_bytes=144, gguf="Q4_K"),
        DType(14, "q6_k", "u1", None, block_values=256, block_bytes=210, gguf="Q6_K"),
        DType(30, "bf16", "<u2", 2, torch="bfloat16", safetensors="BF16", gguf="BF16", is_float=True),
        DType(128, "q4", "u1", None, block_values=32, block_bytes=18),
        DType(129, "q8", "u1", None, block_values=1, block_bytes=1, header_bytes=4),
    )
}
LEGACY_DTYPE_CODES = {8: 128, 9: 129}  # spec: readers accept 8/9, writers write 128/129
DTYPE_BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES.values()}
DTYPE_BY_TORCH: dict[str, DType] = {d.torch: d for d in DTYPES.values() if d.torch}  # also numpy dtype names
DTYPE_BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in DTYPES.values() if d.safetensors}
FLOAT_DTYPES = tuple(d.name for d in DTYPES.values() if d.is_float)
QUANTIZED_DTYPES = frozenset(d.name for d in DTYPES.values() if d.quantized)
