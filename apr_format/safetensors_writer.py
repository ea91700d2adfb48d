"""Writing safetensors without the safetensors package: one streaming writer for exports and training state."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from .errors import CorruptSource
from .fileio import FileRange, Writeback, copy_range, read_range

# Order of safetensors' Rust `Dtype` enum (its derived Ord): `save_file` lays tensors out by
# descending dtype, then by name, and writes the header in that order. We follow it so an
# export of an unsharded model is byte-identical to what transformers' save_pretrained wrote.
_ST_DTYPE_RANK = {
    name: rank for rank, name in enumerate(
        ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
         "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
    )
}
_HEADER_ALIGN = 8


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: safetensors dtype ("BF16", "BOOL"), shape, and a zero-argument producer of its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    produce: Callable[[], memoryview | bytes | FileRange]


def layout(tensors: Iterable[OutTensor]) -> list[OutTensor]:
    """The order safetensors' `save_file` uses: largest dtype first, then by name."""
    return sorted(tensors, key=lambda t: (-_ST_DTYPE_RANK[t.dtype], t.name))


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length plus the space-padded JSON header for `tensors` in the given order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    cursor = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
        cursor += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def file_size(tensors: list[OutTensor], metadata: dict[str, str] | None) -> int:
    """Bytes a safetensors file holding `tensors` will take."""
    return len(header_bytes(tensors, metadata)) + sum(t.nbytes for t in tensors)


def apr_nbytes(data: memoryview | bytes | FileRange) -> int:
    """Byte count of a producer's result."""
    return data.nbytes if isinstance(data, FileRange) else len(data)


def _fileno(out: BinaryIO) -> int | None:
    try:
        return out.fileno()
    except (AttributeError, OSError):  # io.BytesIO and friends (io.UnsupportedOperation is an OSError)
        return None


def write_safetensors(
    out: BinaryIO, tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None,
    on_tensor: Callable[[OutTensor], None] | None = None,
) -> int:
    """Stream a safetensors file to `out`, one tensor at a time; returns bytes written.

    Raises:
        CorruptSource: a producer returned a byte count other than planned.
    """
    ordered = layout(tensors)
    head = header_bytes(ordered, metadata)
    out.write(head)
    written = len(head)
    fd = _fileno(out)
    writeback = Writeback(fd) if fd is not None else None
    for t in ordered:
        data = t.produce()
        if not isinstance(data, FileRange):
            data = memoryview(data).cast("B")
        if apr_nbytes(data) != t.nbytes:
            raise CorruptSource(
                getattr(out, "name", "<stream>"),
                f"tensor {t.name!r}: produced {apr_nbytes(data)} bytes, planned {t.nbytes}",
            )
        if isinstance(data, FileRange) and fd is not None:
            out.flush()
            copy_range(data, fd, writeback=writeback)  # a kernel copy (plain writes into a pipe)
            if out.seekable():
                out.seek(0, os.SEEK_END)  # the copy moved the file position behind the buffer's back
        else:
            out.write(read_range(data) if isinstance(data, FileRange) else data)
            if writeback is not None:
                writeback.written()
        written += t.nbytes
        if on_tensor is not None:
            on_tensor(t)
    return written

