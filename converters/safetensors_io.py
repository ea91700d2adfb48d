"""The safetensors format without the safetensors package: bounds-checked header parsing and a streaming writer."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

from apr_format.constants import DTYPE_BY_NAME
from apr_format.errors import CorruptSource, Truncated, UnknownDType
from apr_format.fileio import FileRange, Writeback, copy_range

# safetensors dtype string -> APR dtype name (the dtypes both formats share).
ST_TO_APR = {
    "F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64",
    "I32": "i32", "I64": "i64", "I8": "i8", "U8": "u8",
}
APR_TO_ST = {v: k for k, v in ST_TO_APR.items()}
# Order of safetensors' Rust `Dtype` enum (its derived Ord): `save_file` lays tensors out by
# descending dtype, then by name, and writes the header in that order. We follow it so an
# export of an unsharded model is byte-identical to what transformers' save_pretrained wrote.
_ST_DTYPE_RANK = {
    name: rank for rank, name in enumerate(
        ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
         "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
    )
}
MAX_HEADER_SIZE = 100_000_000  # the limit the safetensors library itself enforces
_HEADER_ALIGN = 8


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor described by a safetensors header; `start` is absolute in the file."""

    name: str
    dtype: str  # APR dtype name
    shape: tuple[int, ...]
    start: int
    nbytes: int


def parse_header(
    view: memoryview | bytes, path: str, size: int | None = None
) -> tuple[list[HeaderEntry], dict[str, str]]:
    """Parse and check a safetensors file's header, given the file's first bytes (at least the
    header's) and the file's `size` (default: `view` is the whole file).

    Returns the tensor entries (sorted by name) and the `__metadata__` string map.

    Raises:
        Truncated: the file ends inside its header or before a tensor's bytes end.
        CorruptSource: malformed header JSON, bad shapes, offsets or overlapping tensors.
        UnknownDType: a dtype APR has no code for (the tensor is named).
    """
    size = len(view) if size is None else size
    if size < 8:
        raise Truncated(path, f"file is {size} bytes, too short for a safetensors header length")
    (header_len,) = struct.unpack_from("<Q", view, 0)
    if header_len > MAX_HEADER_SIZE:
        raise CorruptSource(path, f"safetensors header length {header_len} exceeds {MAX_HEADER_SIZE} bytes")
    if 8 + header_len > size:
        raise Truncated(path, f"safetensors header declares {header_len} bytes but the file is {size} bytes")
    try:
        header = json.loads(bytes(view[8 : 8 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptSource(path, f"safetensors header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise CorruptSource(path, f"safetensors header is a JSON {type(header).__name__}, expected an object")
    data_start, data_size = 8 + header_len, size - 8 - header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptSource(path, "safetensors __metadata__ must map strings to strings")
    entries = [_entry(name, info, path, data_start, data_size) for name, info in header.items()]
    _check_overlaps(entries, path)
    return sorted(entries, key=lambda e: e.name), metadata


def _entry(name: str, info: object, path: str, data_start: int, data_size: int) -> HeaderEntry:
    if not isinstance(info, dict):
        raise CorruptSource(path, f"tensor {name!r}: header entry is not an object")
    st_dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(st_dtype, str):
        raise CorruptSource(path, f"tensor {name!r}: missing dtype")
    if st_dtype not in ST_TO_APR:
        raise UnknownDType(path, f"tensor {name!r}: safetensors dtype {st_dtype} has no APR equivalent")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptSource(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CorruptSource(path, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    dtype = ST_TO_APR[st_dtype]
    numel = 1
    for dim in shape:
        numel *= dim
    expected = DTYPE_BY_NAME[dtype].nbytes_for(numel)
    if end < begin or end - begin != expected:
        raise CorruptSource(
            path, f"tensor {name!r}: data_offsets {begin}..{end} hold {end - begin} bytes "
            f"but {st_dtype} {shape} needs {expected}",
        )
    if end > data_size:
        raise Truncated(
            path, f"tensor {name!r}: bytes {begin}..{end} lie beyond the data section's end ({data_size} bytes)"
        )
    return HeaderEntry(name, dtype, tuple(shape), data_start + begin, expected)


def _check_overlaps(entries: list[HeaderEntry], path: str) -> None:
    last_end, last_name = 0, None
    for e in sorted((e for e in entries if e.nbytes), key=lambda e: e.start):
        if e.start < last_end:
            raise CorruptSource(path, f"tensors {last_name!r} and {e.name!r} overlap")
        last_end, last_name = e.start + e.nbytes, e.name


@dataclass(frozen=True)
class OutTensor:
    """A tensor to write: APR dtype name, shape, and a zero-argument producer of its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    produce: Callable[[], memoryview | bytes | FileRange]


def layout(tensors: Iterable[OutTensor]) -> list[OutTensor]:
    """The order safetensors' `save_file` uses: largest dtype first, then by name."""
    return sorted(tensors, key=lambda t: (-_ST_DTYPE_RANK[APR_TO_ST[t.dtype]], t.name))


def header_bytes(tensors: list[OutTensor], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length plus the space-padded JSON header for `tensors` in the given order."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    cursor = 0
    for t in tensors:
        header[t.name] = {"dtype": APR_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [cursor, cursor + t.nbytes]}
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


def _read_range(data: FileRange) -> bytes:
    with open(data.path, "rb") as fh:
        fh.seek(data.offset)
        return fh.read(data.nbytes)


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
            out.write(_read_range(data) if isinstance(data, FileRange) else data)
            if writeback is not None:
                writeback.written()
        written += t.nbytes
        if on_tensor is not None:
            on_tensor(t)
    return written

