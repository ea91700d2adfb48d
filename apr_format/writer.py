"""Streaming, atomic writing of .apr files: plan the layout first, then one tensor at a time."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import atomic, compression
from .constants import (
    ALIGNMENT, DTYPE_BY_NAME, DTYPE_BY_TORCH, MAX_ELEMENTS, MAX_METADATA_SIZE, MAX_NAME_LENGTH, MAX_NDIM,
    METADATA_OFFSET, QUANTIZED_DTYPES, DType, Flag, index_entry_size,
)
from .errors import InvalidArgument, Truncated, UnknownDType
from .fileio import CHUNK, FileRange, Writeback, copy_range, crc32
from .header import Header


TensorSource = Any  # np.ndarray | torch.Tensor | bytes-like | FileRange | Callable[[], one of those]


@dataclass
class _Planned:
    name: str
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    source: TensorSource


def pad64(n: int) -> int:
    """`n` rounded up to the next multiple of 64 (spec: pad64)."""
    return -(-n // ALIGNMENT) * ALIGNMENT


class AprWriter:
    """Collects tensors (or producers of them) and writes the file atomically on `close()`.

    Nothing touches the destination until every byte is in a temp file beside it, fsynced;
    then it is renamed into place (without `overwrite`, only where no file is: `OutputExists`
    otherwise). Memory stays bounded by the largest single tensor when tensors are given as
    zero-argument callables (each is called once, while writing).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        *,
        compression: str | None = None,
        flags: int = 0,
        before_publish: Callable[[], None] | None = None,
        overwrite: bool = True,
    ) -> None:
        """`before_publish` runs once every byte is written, before the file takes the destination's
        place: raising there (e.g. the source's checksum did not match) leaves the destination as it was.
        `overwrite=False` publishes only where no file is (atomically: of two writers, one wins)."""
        if compression not in (None, "zstd"):
            raise InvalidArgument(path, f"unknown compression {compression!r} (choose zstd or none)")
        self.path = os.fspath(path)
        self.metadata = dict(metadata or {})
        self.compression = compression
        self.flags = Flag(flags)
        self.before_publish = before_publish
        self.overwrite = overwrite
        self._planned: dict[str, _Planned] = {}
        self._closed = False

    def add(
        self,
        name: str,
        data: TensorSource,
        *,
        dtype: str | None = None,
        shape: tuple[int, ...] | list[int] | None = None,
    ) -> None:
        """Plan one tensor. `dtype` and `shape` are required for callables, raw bytes and FileRanges.

        A `FileRange` (or a callable returning one) is copied file to file by the kernel while the
        CRC is computed: the fastest source when the stored bytes need no change.

        Raises:
            InvalidArgument: a bad or repeated name, missing dtype/shape for a lazy source, a size
                that does not hold the shape. UnknownDType: a dtype APR has no code for.
        """
        encoded = name.encode("utf-8") if isinstance(name, str) else b""
        if not 1 <= len(encoded) <= MAX_NAME_LENGTH:
            raise InvalidArgument(self.path, f"tensor name {name!r} must be 1..{MAX_NAME_LENGTH} UTF-8 bytes")
        if name in self._planned:
            raise InvalidArgument(self.path, f"tensor {name!r} added twice")
        if callable(data) or isinstance(data, FileRange):
            if dtype is None or shape is None:
                raise InvalidArgument(self.path, f"tensor {name!r}: a lazy source needs dtype and shape")
            apr_dtype, dims = _dtype(dtype, self.path), _shape(shape, self.path, name)
        else:
            data, apr_dtype, dims = _as_buffer(data, dtype, shape, self.path, name)
        nbytes = apr_dtype.nbytes_for(math.prod(dims)) if callable(data) else _length(data)
        if not callable(data) and not apr_dtype.packed and nbytes != apr_dtype.nbytes_for(math.prod(dims)):
            raise InvalidArgument(self.path, f"tensor {name!r}: {nbytes} bytes do not hold {apr_dtype.name} {list(dims)}")
        self._planned[name] = _Planned(name, apr_dtype, dims, nbytes, data)

    def close(self) -> None:
        """Write the file (temp beside it, fsync, rename). Idempotent.

        Raises:
            InvalidArgument: a producer returned other bytes than planned; OSError: naming the path;
            whatever `before_publish` raises (the destination is then untouched).
        """
        if self._closed:
            return
        self._closed = True
        self._write()

    def abort(self) -> None:
        """Forget everything; the destination is untouched."""
        self._closed = True
        self._planned.clear()

    def __enter__(self) -> "AprWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing -------------------------------------------------------------------------
    def _write(self) -> None:
        entries = sorted(self._planned.values(), key=lambda e: e.name.encode("utf-8"))
        meta = self._metadata_bytes()
        flags = self.flags | Flag.LAYOUT_ROW_MAJOR
        if any(e.dtype.name in QUANTIZED_DTYPES for e in entries):
            flags |= Flag.QUANTIZED
        if self.compression:
            flags |= Flag.ZSTD
        index_offset = METADATA_OFFSET + pad64(len(meta))
        index_size = sum(index_entry_size(e.name, len(e.shape)) for e in entries)
        data_offset = index_offset + pad64(index_size)
        header = Header(
            flags=int(flags), tensor_count=len(entries), metadata_size=len(meta),
            tensor_index_offset=index_offset, data_offset=data_offset,
        )
        with atomic.replacing(self.path, overwrite=self.overwrite) as out:
            if self.compression:
                self._write_compressed(out, header, meta, entries, index_size)
            else:
                self._write_plain(out, header, meta, entries)
            if self.before_publish is not None:
                self.before_publish()

    def _write_plain(self, out, header: Header, meta: bytes, entries: list[_Planned]) -> None:
        offsets, cursor = [], 0
        for e in entries:
            offsets.append(cursor)
            cursor += pad64(e.nbytes)
        writer = _CrcWriter(out)
        writer.write(header.pack())
        writer.write_padded(meta)
        writer.write_padded(_index_bytes(entries, offsets, [e.nbytes for e in entries]))
        for e in entries:
            writer.write_padded(self._materialize(e))
        out.write(struct.pack("<I", writer.crc))

    def _write_compressed(self, out, header: Header, meta: bytes, entries: list[_Planned], index_size: int) -> None:
        out.write(header.pack())
        out.write(meta + bytes(pad64(len(meta)) - len(meta)))
        out.write(bytes(pad64(index_size)))
        offsets, sizes, cursor = [], [], 0
        for e in entries:
            frame = compression.compress(_read(self._materialize(e)))
            out.write(frame + bytes(pad64(len(frame)) - len(frame)))
            offsets.append(cursor)
            sizes.append(len(frame))
            cursor += pad64(len(frame))
        out.seek(header.tensor_index_offset)
        out.write(_index_bytes(entries, offsets, sizes))
        out.flush()
        out.seek(0)
        crc, remaining = 0, header.data_offset + cursor
        while remaining:
            chunk = out.read(min(CHUNK, remaining))
            crc = crc32(chunk, crc)
            remaining -= len(chunk)
        out.seek(0, os.SEEK_END)
        out.write(struct.pack("<I", crc))

    def _materialize(self, e: _Planned) -> memoryview | FileRange:
        data = e.source
        if callable(data):
            data = data()
        if isinstance(data, FileRange):
            if data.nbytes != e.nbytes:
                raise InvalidArgument(
                    self.path, f"tensor {e.name!r}: source range holds {data.nbytes} bytes, planned {e.nbytes}"
                )
        elif callable(e.source):
            data, dtype, shape = _as_buffer(data, e.dtype.name, e.shape, self.path, e.name)
            if dtype != e.dtype or shape != e.shape or len(data) != e.nbytes:
                raise InvalidArgument(
                    self.path,
                    f"tensor {e.name!r}: source produced {dtype.name} {list(shape)} ({len(data)} bytes), "
                    f"planned {e.dtype.name} {list(e.shape)} ({e.nbytes} bytes)",
                )
        e.source = None  # drop our reference as soon as it is written
        return data

    def _metadata_bytes(self) -> bytes:
        try:
            meta = json.dumps(self.metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidArgument(self.path, f"metadata is not JSON-serialisable: {exc}") from None
        if len(meta) > MAX_METADATA_SIZE:
            raise InvalidArgument(self.path, f"metadata is {len(meta)} bytes, over the 16 MiB limit")
        return meta


class _CrcWriter:
    """Writes through to a file while keeping a running CRC-32 (spec: footer) and starting writeback early."""

    def __init__(self, out) -> None:
        self.out = out
        self.crc = 0
        self.pos = 0
        self.writeback = Writeback(out.fileno())

    def write(self, data: bytes | memoryview | FileRange) -> None:
        if isinstance(data, FileRange):
            self.out.flush()
            self.crc = copy_range(data, self.out.fileno(), self.crc, self.writeback)
            self.out.seek(0, os.SEEK_END)  # the copy moved the file position behind the buffer's back
            self.pos += data.nbytes
            return
        for start in range(0, len(data), CHUNK):
            chunk = data[start : start + CHUNK]
            self.out.write(chunk)
            self.crc = crc32(chunk, self.crc)
            self.pos += len(chunk)
            self.writeback.written(self.pos)

    def write_padded(self, data: bytes | memoryview | FileRange) -> None:
        self.write(data)
        padding = pad64(_length(data)) - _length(data)
        if padding:
            self.write(bytes(padding))


def _length(data: memoryview | FileRange) -> int:
    return data.nbytes if isinstance(data, FileRange) else len(data)


def _read(data: memoryview | FileRange) -> memoryview | bytes:
    """The bytes themselves (zstd needs them in memory)."""
    if not isinstance(data, FileRange):
        return data
    with open(data.path, "rb") as fh:
        fh.seek(data.offset)
        raw = fh.read(data.nbytes)
    if len(raw) != data.nbytes:
        raise Truncated(data.path, f"bytes {data.offset}..{data.offset + data.nbytes} lie beyond the end of the file")
    return raw


def _index_bytes(entries: list[_Planned], offsets: list[int], sizes: list[int]) -> bytes:
    parts = []
    for e, offset, size in zip(entries, offsets, sizes):
        name = e.name.encode("utf-8")
        parts.append(struct.pack("<H", len(name)) + name + bytes((e.dtype.code, len(e.shape))))
        parts.append(struct.pack(f"<{len(e.shape)}QQQ", *e.shape, offset, size))
    return b"".join(parts)


def _as_buffer(
    data: TensorSource, dtype: str | None, shape, path: str, name: str
) -> tuple[memoryview, DType, tuple[int, ...]]:
    """Bytes, dtype and shape of a numpy array, torch tensor or raw buffer."""
    if type(data).__module__.startswith("torch"):
        torch_name = str(data.dtype)
        if torch_name.removeprefix("torch.") not in DTYPE_BY_TORCH:
            raise UnknownDType(path, f"tensor {name!r}: torch dtype {torch_name} has no APR code")
        tensor = data.detach().to("cpu").contiguous()
        inferred, dims = DTYPE_BY_TORCH[torch_name.removeprefix("torch.")].name, tuple(tensor.shape)
        import torch

        data = tensor.reshape(-1).view(torch.uint8).numpy()
        if dtype is not None and _dtype(dtype, path).name != inferred:
            raise InvalidArgument(path, f"tensor {name!r}: torch {torch_name} given with dtype {dtype!r}")
        return memoryview(data), _dtype(inferred, path), _shape(shape if shape is not None else dims, path, name)
    if isinstance(data, np.ndarray):
        return _numpy_buffer(data, dtype, shape, path, name)
    try:
        view = memoryview(data).cast("B")
    except TypeError:
        raise InvalidArgument(path, f"tensor {name!r}: cannot write a {type(data).__name__}") from None
    if dtype is None or shape is None:
        raise InvalidArgument(path, f"tensor {name!r}: raw bytes need dtype and shape")
    return view, _dtype(dtype, path), _shape(shape, path, name)


def _numpy_buffer(arr: np.ndarray, dtype: str | None, shape, path: str, name: str):
    inferred = DTYPE_BY_TORCH[arr.dtype.name].name if arr.dtype.name in DTYPE_BY_TORCH else None
    if dtype is not None:
        target = _dtype(dtype, path)
        if target.packed or (target.name == "bf16" and arr.dtype == np.uint16):
            arr_bytes = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            dims = _shape(shape if shape is not None else arr.shape, path, name)
            return memoryview(arr_bytes), target, dims
        if inferred != target.name:
            raise InvalidArgument(path, f"tensor {name!r}: numpy {arr.dtype} given with dtype {dtype!r}")
    if inferred is None:
        raise UnknownDType(path, f"tensor {name!r}: numpy dtype {arr.dtype} has no APR code")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype)
    dims = _shape(shape if shape is not None else arr.shape, path, name)
    return memoryview(little.reshape(-1).view(np.uint8)), _dtype(inferred, path), dims


def _dtype(dtype: str, path: str) -> DType:
    try:
        return DTYPE_BY_NAME[dtype]
    except KeyError:
        raise UnknownDType(path, f"unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_BY_NAME))})") from None


def _shape(shape, path: str, name: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_NDIM or any(d < 0 for d in dims):
        raise InvalidArgument(path, f"tensor {name!r}: shape {list(dims)} needs ndim <= {MAX_NDIM} and dims >= 0")
    if math.prod(tuple(max(d, 1) for d in dims)) > MAX_ELEMENTS:
        raise InvalidArgument(path, f"tensor {name!r}: shape {list(dims)} is too large for any array")
    return dims



def save_apr(
    path: str | os.PathLike,
    tensors: Mapping[str, TensorSource],
    metadata: Mapping[str, Any] | None = None,
    **writer_kwargs: Any,
) -> None:
    """Write `tensors` (name -> array, tensor or callable) and `metadata` to `path` atomically.

    Arrays keep their dtype (numpy float32/float16/float64, ml_dtypes.bfloat16, ints; torch
    tensors likewise); `writer_kwargs` go to AprWriter (compression="zstd", flags=...).

    Returns:
        None; `path` holds the complete file, or is untouched when anything failed.

    Raises:
        InvalidArgument: a bad name, shape or dtype combination; UnknownDType: a dtype APR lacks.
        OSError: the destination cannot be written (the message names `path`).
    """
    with AprWriter(path, metadata, **writer_kwargs) as writer:
        for name, data in tensors.items():
            writer.add(name, data)
