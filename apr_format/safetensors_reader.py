"""Reading safetensors without the safetensors package: bounds-checked header parsing (the writer is apr_format.safetensors_writer)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .constants import DTYPE_BY_NAME, DTYPE_BY_SAFETENSORS
from .errors import CorruptSource, Truncated, UnknownDType, json_problem
from .sourceio import read_exact

MAX_HEADER_SIZE = 100_000_000  # the limit the safetensors library itself enforces


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
        raise CorruptSource(path, f"safetensors header is not valid UTF-8 JSON ({json_problem(exc, 8)})") from None
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
    if st_dtype not in DTYPE_BY_SAFETENSORS:
        raise UnknownDType(path, f"tensor {name!r}: safetensors dtype {st_dtype} has no APR equivalent")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptSource(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CorruptSource(path, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    dtype = DTYPE_BY_SAFETENSORS[st_dtype].name
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


def read_header(fd: int, path: str) -> tuple[list[HeaderEntry], dict[str, str]]:
    """`parse_header` of the open safetensors file `fd`, its header read with pread (nothing is mapped).

    Raises:
        As `parse_header`; Truncated also when the file is cut short while the header is read.
    """
    size = os.fstat(fd).st_size
    head = read_exact(fd, 0, min(size, 8), path)
    if size >= 8:  # the header's length, then the header (parse_header checks both against `size`)
        header_len = int.from_bytes(head, "little")
        head = read_exact(fd, 0, min(size, 8 + header_len, 8 + MAX_HEADER_SIZE), path)
    return parse_header(head, path, size)
