"""Lazy reading of .apr files (zero-copy through mmap, or pread copies), with every structural check of the spec."""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
import warnings
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import compression, quants
from .constants import (
    ALIGNMENT, DTYPE_BY_NAME, DTYPES, FOOTER_SIZE, HEADER_SIZE, LEGACY_DTYPE_CODES, MAX_ELEMENTS, MAX_METADATA_SIZE,
    QUANTIZED_DTYPES,
    MAX_NAME_LENGTH, MAX_NDIM, METADATA_OFFSET, MIN_INDEX_ENTRY_SIZE, DType, Flag,
)
from .errors import (
    AprError, CorruptIndex, CorruptMetadata, FooterChecksum, MissingTensor, NotAFile, Truncated, UnknownDType,
    Unreadable, UnsupportedFeature, from_os_error, json_problem,
)
from .fileio import crc32_fd
from .integrity import footer_mismatch
from .header import Header, unpack_header
from .sourceio import check_size, mmap_is_safe, read_exact

_MAX_INDEX_ENTRY = 2 + MAX_NAME_LENGTH + 2 + 8 * MAX_NDIM + 16


@dataclass(frozen=True)
class TensorInfo:
    """One index entry. `offset` is relative to `data_offset`; `size` is stored bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    size: int
    nbytes: int  # decoded bytes (differs from `size` only for zstd-compressed files)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class AprFile(Mapping):
    """An open .apr file: a read-only mapping of tensor name -> numpy array.

    Parsing checks header, metadata and index (read with pread); data stays on disk. `in`, `len`,
    `.get`, `.keys`, `.items` work as on a dict; a missing name raises MissingTensor, which is also
    a KeyError.

    With `use_mmap` (the default on local file systems; None chooses) `f["name"]` is a view into a
    private (copy-on-write) mapping, so writing to a returned array never touches the file; the
    file's size is checked before each access, yet a program cutting the file short *during* an
    access still kills the process with SIGBUS. Without it, every access is a pread copy and a
    shrunken file is a `Truncated` error: what every CLI command and converter uses.

    Opening reads the header, metadata and index only: the footer CRC-32 is checked by
    `verify()` (one read of the whole file) or `StreamingVerifier` (while the bytes are read).

    Raises:
        FileMissing, NotAFile, Unreadable: the path cannot be opened (also OSError subclasses).
        BadMagic, Truncated, CorruptMetadata, CorruptIndex, UnknownDType, ...: a broken file.
    """

    def __init__(self, path: str | os.PathLike, *, use_mmap: bool | None = None) -> None:
        self.path = os.fspath(path)
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        try:  # O_NONBLOCK: a FIFO opens at once (and is refused below) instead of waiting for a writer
            self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise from_os_error(self.path, exc) from None
        self._close_fd = weakref.finalize(self, os.close, self._fd)  # also when never closed explicitly
        try:
            info = os.fstat(self._fd)
            if stat.S_ISDIR(info.st_mode):
                raise NotAFile(self.path, "is a folder, expected a file")
            if not stat.S_ISREG(info.st_mode):
                raise Unreadable(self.path, "is not a regular file (a pipe, socket or device)")
            self.file_size = info.st_size
            if self.file_size == 0:
                raise Truncated(self.path, "file is empty")
            self.header: Header = unpack_header(read_exact(self._fd, 0, min(HEADER_SIZE, self.file_size), self.path),
                                                self.path)
            self._check_sections()
            self.metadata: dict[str, Any] = self._parse_metadata()
            self._tensors: dict[str, TensorInfo] = self._parse_index()
            if use_mmap is None:
                use_mmap = mmap_is_safe(self.path)
            if use_mmap:
                check_size(self._fd, self.file_size, self.path)
                self._map = mmap.mmap(self._fd, self.file_size, access=mmap.ACCESS_COPY)
                self._view = memoryview(self._map)
        except BaseException:
            self.close()
            raise

    # -- parsing -------------------------------------------------------------------------
    def _check_sections(self) -> None:
        h, size = self.header, self.file_size
        if h.metadata_offset != METADATA_OFFSET:
            raise CorruptMetadata(self.path, f"metadata_offset is {h.metadata_offset}, expected {METADATA_OFFSET}")
        if h.metadata_size > MAX_METADATA_SIZE:
            raise CorruptMetadata(self.path, f"metadata_size {h.metadata_size} exceeds the 16 MiB limit")
        meta_end = h.metadata_offset + h.metadata_size
        if not meta_end <= h.tensor_index_offset <= h.data_offset:
            raise CorruptIndex(
                self.path,
                f"sections out of order: metadata ends at {meta_end}, index at {h.tensor_index_offset}, "
                f"data at {h.data_offset}",
            )
        if h.data_offset % ALIGNMENT:
            raise CorruptIndex(self.path, f"data_offset {h.data_offset} is not {ALIGNMENT}-byte aligned")
        if h.data_offset + FOOTER_SIZE > size:
            raise Truncated(self.path, f"file is {size} bytes but its data section starts at {h.data_offset}")
        max_entries = (h.data_offset - h.tensor_index_offset) // MIN_INDEX_ENTRY_SIZE
        if h.tensor_count > max_entries:
            raise CorruptIndex(
                self.path,
                f"tensor_count {h.tensor_count} cannot fit in a {h.data_offset - h.tensor_index_offset}-byte "
                f"index (at most {max_entries} entries)",
            )

    def _parse_metadata(self) -> dict[str, Any]:
        h = self.header
        if not h.metadata_size:
            return {}
        raw = read_exact(self._fd, h.metadata_offset, h.metadata_size, self.path)
        try:
            meta = json.loads(bytes(raw).decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            problem = json_problem(exc, h.metadata_offset)
            raise CorruptMetadata(self.path, f"metadata is not valid UTF-8 JSON ({problem})") from None
        if not isinstance(meta, dict):
            raise CorruptMetadata(self.path, f"metadata is a JSON {type(meta).__name__}, expected an object")
        return {k: v for k, v in meta.items() if v is not None}

    def _parse_index(self) -> dict[str, TensorInfo]:
        h = self.header
        pos, end = h.tensor_index_offset, h.data_offset
        # Entries are at most _MAX_INDEX_ENTRY bytes: never read more than tensor_count of them need.
        base = h.tensor_index_offset
        view = read_exact(self._fd, base, min(end - base, h.tensor_count * _MAX_INDEX_ENTRY), self.path)
        data_room = self.file_size - FOOTER_SIZE - h.data_offset
        compressed = bool(h.flags & Flag.ZSTD)
        tensors: dict[str, TensorInfo] = {}
        previous: bytes | None = None
        for i in range(h.tensor_count):
            def need(n: int, what: str) -> None:
                if pos + n > end:
                    raise CorruptIndex(self.path, f"index entry {i} ({what}) runs past the index section end {end}")

            need(2, "name length")
            (name_len,) = struct.unpack_from("<H", view, pos - base)
            if name_len == 0 or name_len > MAX_NAME_LENGTH:
                raise CorruptIndex(self.path, f"index entry {i}: name length {name_len} is not in 1..{MAX_NAME_LENGTH}")
            need(2 + name_len + 2, "name")
            raw_name = bytes(view[pos - base + 2 : pos - base + 2 + name_len])
            try:
                name = raw_name.decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptIndex(self.path, f"index entry {i}: name is not UTF-8") from None
            pos += 2 + name_len
            code, ndim = view[pos - base], view[pos - base + 1]
            dtype = _lookup_dtype(code, self.path, name)
            if ndim > MAX_NDIM:
                raise CorruptIndex(self.path, f"tensor {name!r}: ndim {ndim} exceeds {MAX_NDIM}")
            need(2 + 8 * ndim + 16, "shape, offset and size")
            shape = struct.unpack_from(f"<{ndim}Q", view, pos - base + 2)
            offset, size = struct.unpack_from("<QQ", view, pos - base + 2 + 8 * ndim)
            pos += 2 + 8 * ndim + 16
            if previous is not None and raw_name <= previous:
                problem = "duplicate tensor name" if raw_name == previous else "index is not sorted by name at"
                raise CorruptIndex(self.path, f"{problem} {name!r}")
            previous = raw_name
            info = self._check_entry(name, dtype, shape, offset, size, data_room, compressed)
            tensors[name] = info
        if pos > end:  # pragma: no cover - guarded by need()
            raise CorruptIndex(self.path, "index overruns the data section")
        self._check_overlaps(tensors.values())
        return tensors

    def _check_entry(
        self, name: str, dtype: DType, shape: tuple[int, ...], offset: int, size: int, room: int, compressed: bool
    ) -> TensorInfo:
        numel, extent = 1, 1
        for dim in shape:
            numel *= dim
            extent *= max(dim, 1)
        if extent > MAX_ELEMENTS:  # numpy cannot even describe it, empty or not
            raise CorruptIndex(self.path, f"tensor {name!r}: shape {list(shape)} is too large for any array")
        expected = dtype.nbytes_for(numel)
        if not compressed and size != expected and not (dtype.packed and dtype.name in ("q4_k", "q6_k")):
            raise CorruptIndex(
                self.path, f"tensor {name!r}: {size} bytes stored but {dtype.name} {list(shape)} needs {expected}"
            )
        if offset % ALIGNMENT:
            raise CorruptIndex(self.path, f"tensor {name!r}: offset {offset} is not {ALIGNMENT}-byte aligned")
        if offset > room or size > room - offset:
            raise Truncated(
                self.path,
                f"tensor {name!r}: bytes {offset}..{offset + size} of the data section lie beyond "
                f"the file's end ({room} data bytes before the footer)",
            )
        nbytes = expected if compressed else size
        return TensorInfo(name, dtype.name, tuple(shape), offset, size, nbytes)

    def _check_overlaps(self, infos) -> None:
        last_end, last_name = 0, None
        for info in sorted((t for t in infos if t.size), key=lambda t: t.offset):
            if info.offset < last_end:
                raise CorruptIndex(self.path, f"tensors {last_name!r} and {info.name!r} overlap")
            last_end, last_name = info.offset + info.size, info.name

    # -- access --------------------------------------------------------------------------
    @property
    def mapped(self) -> bool:
        """Whether tensor access hands out views of a memory map (else pread copies)."""
        return self._view is not None

    @property
    def flags(self) -> Flag:
        """The header's flag bits."""
        return Flag(self.header.flags)

    @property
    def data_end(self) -> int:
        """Where the data section ends: after the last tensor and its padding to 64 bytes."""
        ends = [-(-(t.offset + t.size) // ALIGNMENT) * ALIGNMENT for t in self._tensors.values()]
        return self.header.data_offset + max(ends, default=0)

    @property
    def trailing_bytes(self) -> int:
        """Bytes between the end of the data section and the last 4 (footer) bytes: 0 in a well-formed
        file; more when something was appended (then the last 4 bytes are not the real footer)."""
        return max(0, self.file_size - FOOTER_SIZE - self.data_end)

    def keys(self) -> list[str]:  # type: ignore[override]  # a list, as callers index and slice it
        """Tensor names in index (sorted) order."""
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def tensors(self) -> list[TensorInfo]:
        """Every index entry in index order."""
        return list(self._tensors.values())

    def info(self, name: str) -> TensorInfo:
        """The index entry of `name`.

        Raises:
            MissingTensor (a KeyError): no tensor of that name.
        """
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingTensor(self.path, f"no tensor named {name!r}") from None

    def stored(self, name: str) -> memoryview:
        """The tensor's bytes exactly as stored (a zstd frame when compressed), zero-copy.

        Raises:
            MissingTensor (a KeyError): no tensor of that name.
        """
        info = self.info(name)
        return self._bytes_at(self.header.data_offset + info.offset, info.size)

    def raw(self, name: str) -> memoryview:
        """The tensor's decoded bytes: zero-copy unless the file is zstd-compressed.

        Raises:
            MissingTensor (a KeyError): no tensor of that name.
            UnsupportedFeature / CorruptIndex: a zstd frame that does not inflate to its size.
        """
        stored = self.stored(name)
        if not self.header.flags & Flag.ZSTD:
            return stored
        return memoryview(compression.decompress(stored, self.info(name).nbytes, self.path, name))

    def __getitem__(self, name: str) -> np.ndarray:
        """A numpy view of the tensor's values in its own dtype (bf16 as `ml_dtypes.bfloat16`).

        Packed quantized types (q4, q8, q4_k, q6_k) come as their uint8 bytes: use `to_float32`.

        Raises:
            MissingTensor (a KeyError): no tensor of that name.
        """
        info = self.info(name)
        arr = self.bits(name)
        if info.dtype == "bf16":
            import ml_dtypes

            arr = arr.view(ml_dtypes.bfloat16)
        return arr

    def bits(self, name: str) -> np.ndarray:
        """The tensor as stored, without interpreting it: bf16 as its uint16 bit patterns, every other
        plain dtype as itself, packed quantized types as flat uint8 bytes (a zero-copy view).

        Raises:
            MissingTensor (a KeyError): no tensor of that name.
        """
        info = self.info(name)
        dtype = _dtype_of(info)
        arr = np.frombuffer(self.raw(name), dtype=np.dtype(dtype.numpy))
        return arr if dtype.packed else arr.reshape(info.shape)

    def to_float32(self, name: str) -> np.ndarray:
        """The tensor as float32 values (a copy), dequantizing q4 / q8.

        Raises:
            UnsupportedFeature: for q4_k / q6_k, which we read only as raw bytes so far.
        """
        info = self.info(name)
        raw = self.raw(name)
        if info.dtype == "q8":
            return quants.dequantize_q8(raw, info.numel).reshape(info.shape)
        if info.dtype == "q4":
            return quants.dequantize_q4(raw, info.numel).reshape(info.shape)
        if info.dtype in ("q4_k", "q6_k"):
            raise UnsupportedFeature(self.path, f"tensor {name!r}: dequantizing {info.dtype} is not supported yet")
        arr = self.bits(name)
        if info.dtype == "bf16":
            return (arr.astype(np.uint32) << 16).view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # f64 beyond f32 range becomes inf, NaN stays NaN
            return arr.astype(np.float32)

    def torch(self, name: str):
        """A torch tensor viewing the mapping (bf16 stays bf16; q4/q8 are dequantized). Imports torch.

        Raises:
            MissingTensor (a KeyError); UnsupportedFeature for q4_k / q6_k.
        """
        import torch

        info = self.info(name)
        if info.dtype in QUANTIZED_DTYPES:
            return torch.from_numpy(self.to_float32(name))
        torch_dtype = DTYPE_BY_NAME[info.dtype].torch
        raw = self.raw(name)
        if not len(raw):
            return torch.empty(info.shape, dtype=getattr(torch, torch_dtype))
        with warnings.catch_warnings():  # the buffer is writable copy-on-write; silence anyway
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(raw, dtype=getattr(torch, torch_dtype))
        return flat.reshape(info.shape)

    def verify(self) -> None:
        """Check the footer CRC-32 over the whole file (reads every byte once with pread, in bounded
        memory, from the file this object opened even if its path was replaced since).

        To check while reading the tensors anyway, use `StreamingVerifier` instead.

        Raises:
            FooterChecksum: the stored CRC does not match the content.
            Truncated: the file was cut short while being read.
        """
        fd = self._open_fd()
        body = self.file_size - FOOTER_SIZE
        (stored,) = struct.unpack_from("<I", read_exact(fd, body, 4, self.path))
        crc = crc32_fd(fd, 0, body, path=self.path)
        if crc != stored:
            raise FooterChecksum(self.path, footer_mismatch(stored, crc, self.trailing_bytes))

    def _bytes_at(self, start: int, nbytes: int) -> memoryview:
        """File bytes start..start+nbytes: a view of the mapping (after a size check) or a pread copy."""
        fd = self._open_fd()
        if self._view is None:
            return read_exact(fd, start, nbytes, self.path)
        check_size(fd, self.file_size, self.path)
        return self._view[start : start + nbytes]

    def fileno(self) -> int:
        """The descriptor of the opened file (reads through it see this file even if its path was replaced).

        Raises:
            AprError: the file is closed.
        """
        return self._open_fd()

    def _open_fd(self) -> int:
        if self._fd is None:
            raise AprError(self.path, "file is closed")
        return self._fd

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Release the file and mapping (the mapping is left to the garbage collector while views are alive)."""
        self._fd = None
        if hasattr(self, "_close_fd"):
            self._close_fd()
        view, self._view = getattr(self, "_view", None), None
        mapping, self._map = self._map, None
        if view is not None:
            try:
                view.release()
            except BufferError:
                pass
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                pass  # numpy/torch views still use it; it is unmapped when they die

    __eq__ = object.__eq__  # identity, not Mapping's item-by-item comparison of arrays
    __hash__ = object.__hash__

    def __enter__(self) -> "AprFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AprFile({self.path!r}, tensors={len(self._tensors)})"


def _reject_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")  # Python accepts NaN/Infinity; JSON (and our writer) does not


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _lookup_dtype(code: int, path: str, name: str) -> DType:
    code = LEGACY_DTYPE_CODES.get(code, code)
    try:
        return DTYPES[code]
    except KeyError:
        raise UnknownDType(path, f"tensor {name!r}: unknown dtype code {code}") from None


def _dtype_of(info: TensorInfo) -> DType:
    return DTYPE_BY_NAME[info.dtype]


def open_apr(path: str | os.PathLike, *, use_mmap: bool | None = None) -> AprFile:
    """Open an .apr file lazily: header, metadata and index are parsed and checked, tensor bytes
    stay on disk until asked for. Use it as a context manager to release the file.

    `use_mmap`: True hands out zero-copy views; False reads every tensor with pread (a file cut
    short meanwhile is a `Truncated` error, never SIGBUS); None (default) maps unless the file lies
    on a network or FUSE file system, or APR_NO_MMAP=1 is set.

    Returns:
        An `AprFile`: a read-only mapping of tensor name -> numpy array, with `.metadata`,
        `.header`, `.tensors()` (index entries), `.to_float32(name)`, `.torch(name)`, `.verify()`.

    Raises:
        FileMissing, NotAFile, Unreadable: the path cannot be opened (also OSError subclasses).
        BadMagic (another kind of file), LegacyFormat, UnsupportedVersion, HeaderChecksum,
        Truncated, CorruptMetadata, CorruptIndex, UnknownDType, ColumnMajor, UnsupportedFeature.
    """
    return AprFile(path, use_mmap=use_mmap)
