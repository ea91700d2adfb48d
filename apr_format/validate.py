"""Whole-file validation of an .apr: every structural check, footer CRC, layout, alignment, NaN/Inf scan."""

from __future__ import annotations

import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

import numpy as np

from . import quants
from .constants import ALIGNMENT, DTYPE_BY_NAME, FOOTER_SIZE, HEADER_SIZE, Flag, index_entry_size
from .errors import (
    AprError, BadMagic, ColumnMajor, CorruptIndex, CorruptMetadata, HeaderChecksum, LegacyFormat,
    Truncated, UnknownDType, UnsupportedFeature, UnsupportedVersion, from_os_error,
)
from .fileio import CHUNK, crc32
from .header import unpack_header
from .integrity import footer_mismatch
from .reader import AprFile, open_apr
from .writer import pad64

PASS, FAIL = "PASS", "FAIL"
SCAN_CHUNK = 4 * 1024 * 1024  # elements per step of the NaN/Inf scan: bounded memory whatever the tensor

# Stages of parsing in the order the reader runs them, and the error classes each raises.
_HEADER_STAGES = (
    ("magic", (BadMagic, LegacyFormat)),
    ("header", (Truncated, UnsupportedVersion)),
    ("header checksum", (HeaderChecksum,)),
    ("flags", (ColumnMajor, UnsupportedFeature)),
)
_HEADER_PASS = {"magic": "APR\\0", "header": f"{HEADER_SIZE} bytes, version 2", "header checksum": "matches"}
_BODY_STAGES = (
    ("metadata", (CorruptMetadata,)),
    ("tensor index", (CorruptIndex, UnknownDType)),
    ("tensor bounds", (Truncated,)),
)
# IEEE bit patterns: (unsigned view, exponent-all-ones value, mask without the sign bit).
# |bits| == exp is +-Inf, |bits| > exp is NaN; no float conversion needed (bf16 has no numpy type).
_FLOAT_BITS = {
    "f16": (np.dtype("<u2"), 0x7C00, 0x7FFF),
    "bf16": (np.dtype("<u2"), 0x7F80, 0x7FFF),
    "f32": (np.dtype("<u4"), 0x7F800000, 0x7FFFFFFF),
    "f64": (np.dtype("<u8"), 0x7FF0000000000000, 0x7FFFFFFFFFFFFFFF),
}


@dataclass(frozen=True)
class Check:
    """One check's outcome: `status` is "PASS" or "FAIL"."""

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class NonFinite:
    """NaN and Inf counts of one tensor that has any."""

    name: str
    dtype: str
    nan: int
    inf: int


@dataclass
class ValidationReport:
    """Everything `validate_file` found; `failed` counts failing checks."""

    path: str
    format: str = "apr"  # or "safetensors" / "hf" (converters.validate_hf)
    checks: list[Check] = field(default_factory=list)
    total_tensors: int = 0
    total_nan: int = 0
    total_inf: int = 0
    nonfinite: list[NonFinite] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(c.status == FAIL for c in self.checks)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, PASS if ok else FAIL, detail))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the `apr validate --json` document)."""
        return {
            "path": self.path,
            "format": self.format,
            "checks": [asdict(c) for c in self.checks],
            "failed": self.failed,
            "total_tensors": self.total_tensors,
            "total_nan": self.total_nan,
            "total_inf": self.total_inf,
            "nonfinite": [asdict(t) for t in self.nonfinite],
        }


def validate_file(path: str | os.PathLike) -> ValidationReport:
    """Run every check on `path`; problems in the file become FAIL checks, never exceptions.

    Checks that need a parsed file are skipped once parsing fails.

    Raises:
        FileMissing, NotAFile, Unreadable (AprError and OSError subclasses): the file cannot be opened.
    """
    report = ValidationReport(os.fspath(path))
    try:
        fh = open(report.path, "rb")
    except OSError as exc:
        raise from_os_error(report.path, exc) from None
    with fh:
        if not _check_header(report, fh.read(HEADER_SIZE)):
            return report
        try:
            apr = open_apr(report.path, use_mmap=False)
        except AprError as exc:
            report.add(_stage_of(exc, _BODY_STAGES, "structure"), False, exc.problem)
            return report
        with apr:
            report.total_tensors = len(apr)
            report.add("metadata", True, f"{len(apr.metadata)} keys, {apr.header.metadata_size} bytes of JSON")
            report.add("tensor index", True, f"{len(apr)} entries, sorted, unique, known dtypes, sizes match shapes")
            report.add("tensor bounds", True, "every tensor lies inside the data section, no overlaps")
            _check_layout(report, apr, fh)
            _check_alignment(report, apr)
            crc, counts = checksum_pass(fh, apr)
            _check_footer(report, apr, fh, crc)
            _check_data(report, apr, counts)
    return report


def _stage_of(exc: AprError, stages, fallback: str) -> str:
    return next((name for name, classes in stages if isinstance(exc, classes)), fallback)


def _check_header(report: ValidationReport, raw: bytes) -> bool:
    """Header-level checks; on failure the stages before the failing one are reported as passed."""
    try:
        header = unpack_header(raw, report.path)
    except AprError as exc:
        failed = _stage_of(exc, _HEADER_STAGES, "header")
        names = [name for name, _ in _HEADER_STAGES]
        for name in names[: names.index(failed)]:
            report.add(name, True, _HEADER_PASS[name])
        report.add(failed, False, exc.problem)
        return False
    report.add("magic", True, _HEADER_PASS["magic"])
    report.add("header", True, f"{HEADER_SIZE} bytes, version {header.version_major}.{header.version_minor}")
    report.add("header checksum", True, f"stored {header.checksum:#010x} matches")
    report.add("flags", True, _flag_names(header.flags))
    return True


def _flag_names(flags: int) -> str:
    names = [f.name for f in Flag if flags & f]
    return ", ".join(names) if names else "none"


def _check_layout(report: ValidationReport, apr: AprFile, fh: BinaryIO) -> None:
    """Spec "Layout": sections back to back at pad64 boundaries, zero padding, footer right after the data."""
    h = apr.header
    problem = _layout_problem(apr, fh)
    report.add(
        "layout", problem is None,
        problem or f"metadata at {h.metadata_offset}, index at {h.tensor_index_offset}, data at {h.data_offset}, "
        "tensors in index order, zero padding, footer right after the data",
    )


def _layout_problem(apr: AprFile, fh: BinaryIO) -> str | None:
    h = apr.header
    infos = apr.tensors()
    index_bytes = sum(index_entry_size(t.name, len(t.shape)) for t in infos)
    if h.tensor_index_offset != h.metadata_offset + pad64(h.metadata_size):
        return f"tensor_index_offset is {h.tensor_index_offset}, expected {h.metadata_offset + pad64(h.metadata_size)}"
    if h.data_offset != h.tensor_index_offset + pad64(index_bytes):
        return f"data_offset is {h.data_offset}, expected {h.tensor_index_offset + pad64(index_bytes)}"
    zero_ranges = [
        ("reserved header bytes", 44, HEADER_SIZE),
        ("metadata padding", h.metadata_offset + h.metadata_size, h.tensor_index_offset),
        ("index padding", h.tensor_index_offset + index_bytes, h.data_offset),
    ]
    cursor = 0
    for t in infos:
        if t.offset != cursor:
            return f"tensor {t.name!r} starts at data offset {t.offset}, expected {cursor} (hole or out of order)"
        start = h.data_offset + t.offset
        zero_ranges.append((f"padding after {t.name!r}", start + t.size, start + pad64(t.size)))
        cursor += pad64(t.size)
    if h.data_offset + cursor != apr.file_size - FOOTER_SIZE:
        extra = apr.file_size - FOOTER_SIZE - h.data_offset - cursor
        return f"{extra} unexpected bytes between the last tensor and the footer"
    for what, start, end in zero_ranges:
        fh.seek(start)
        if fh.read(end - start).strip(b"\0"):
            return f"{what} (bytes {start}..{end}) are not all zero"
    return None


def _check_alignment(report: ValidationReport, apr: AprFile) -> None:
    misaligned = [t.name for t in apr.tensors() if (apr.header.data_offset + t.offset) % ALIGNMENT]
    report.add(
        "alignment", not misaligned,
        f"{len(misaligned)} tensors not {ALIGNMENT}-byte aligned, first {misaligned[0]!r}" if misaligned
        else f"every tensor starts on a {ALIGNMENT}-byte boundary",
    )


def checksum_pass(fh: BinaryIO, apr: AprFile) -> tuple[int, dict[str, tuple[int, int]]]:
    """One sequential read of the file through a CHUNK-sized buffer (flat memory, nothing mapped).

    Returns:
        The CRC-32 of every byte before the footer and, from the same bytes, name -> (NaN, Inf)
        counts of every f16/bf16/f32/f64 tensor of an uncompressed file (others are absent).
    """
    body = apr.file_size - FOOTER_SIZE
    base = apr.header.data_offset
    scan = not apr.header.flags & Flag.ZSTD
    spans = sorted(((base + t.offset, t) for t in apr.tensors() if scan and t.dtype in _FLOAT_BITS and t.size),
                   key=lambda span: span[0])
    counts = {t.name: (0, 0) for _, t in spans}
    buffer = memoryview(bytearray(max(1, min(CHUNK, body))))
    crc, pos, next_span = 0, 0, 0
    fh.seek(0)
    while pos < body:
        n = _read_full(fh, buffer[: min(len(buffer), body - pos)])
        if not n:
            break  # the file shrank under us: the CRC then disagrees with the footer
        chunk, end = buffer[:n], pos + n
        crc = crc32(chunk, crc)
        # Chunks start at multiples of CHUNK and tensors at multiples of 64: no element is split.
        for start, info in spans[next_span:]:
            if start >= end:
                break
            lo, hi = max(start, pos), min(start + info.size, end)
            view, exp, mask = _FLOAT_BITS[info.dtype]
            nan, inf = _count_bits(chunk[lo - pos : hi - pos], view, exp, mask, (hi - lo) // view.itemsize)
            counts[info.name] = (counts[info.name][0] + nan, counts[info.name][1] + inf)
            if start + info.size <= end:
                next_span += 1
        pos = end
    return crc, counts


def _read_full(fh: BinaryIO, view: memoryview) -> int:
    """readinto until `view` is full or the file ends (keeps chunk starts at multiples of CHUNK)."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _check_footer(report: ValidationReport, apr: AprFile, fh: BinaryIO, crc: int) -> None:
    fh.seek(apr.file_size - FOOTER_SIZE)
    (stored,) = struct.unpack("<I", fh.read(FOOTER_SIZE).rjust(FOOTER_SIZE, b"\0"))
    if crc != stored:  # the reader's wording (AprFile.verify)
        report.add("footer checksum", False, footer_mismatch(stored, crc, apr.trailing_bytes))
    else:
        report.add("footer checksum", True, "CRC-32 of the whole file matches")


def _check_data(report: ValidationReport, apr: AprFile, counts: dict[str, tuple[int, int]]) -> None:
    """Decode every zstd frame (compressed files) and scan float tensors for NaN/Inf, chunk by chunk
    (`counts` holds those the read pass already scanned)."""
    compressed = bool(apr.header.flags & Flag.ZSTD)
    frame_errors: list[AprError] = []
    skipped: list[str] = []
    scanned = 0
    for info in apr.tensors():
        scannable = info.dtype in _FLOAT_BITS or info.dtype in ("q4", "q8")
        if info.dtype in ("q4_k", "q6_k"):
            skipped.append(info.name)
        if not (scannable or compressed):
            continue
        if info.name in counts:
            nan, inf = counts[info.name]
        else:
            try:
                raw = apr.raw(info.name)
            except AprError as exc:
                frame_errors.append(exc)
                continue
            if not scannable:
                continue
            nan, inf = count_nonfinite(raw, info.dtype, info.numel)
        scanned += 1
        if nan or inf:
            report.nonfinite.append(NonFinite(info.name, info.dtype, nan, inf))
            report.total_nan += nan
            report.total_inf += inf
    if compressed:
        report.add(
            "zstd frames", not frame_errors,
            f"{len(frame_errors)} corrupt, first: {frame_errors[0].problem}" if frame_errors
            else f"all {len(apr)} frames inflate to their declared size",
        )
    if report.nonfinite:
        worst = max(report.nonfinite, key=lambda t: t.nan + t.inf)
        detail = (
            f"{report.total_nan} NaN and {report.total_inf} Inf in {len(report.nonfinite)} tensors "
            f"(most in {worst.name!r}: {worst.nan} NaN, {worst.inf} Inf)"
        )
    else:
        detail = f"no NaN or Inf in {scanned} float tensors"
    if skipped:
        detail += f"; {len(skipped)} q4_k/q6_k tensors not scanned"
    report.add("nan/inf", not report.nonfinite, detail)


def count_nonfinite(raw: memoryview, dtype: str, numel: int) -> tuple[int, int]:
    """(NaN, Inf) counts of `numel` values of `dtype` (f16/bf16/f32/f64 bits, q8, q4) in `raw`."""
    if dtype in _FLOAT_BITS:
        return _count_bits(raw, *_FLOAT_BITS[dtype], numel)
    if dtype == "q8":
        return _count_q8(raw, numel)
    return _count_q4(raw, numel)


def _count_bits(raw: memoryview, view: np.dtype, exp: int, mask: int, numel: int) -> tuple[int, int]:
    nan = inf = 0
    exp_v, mask_v = view.type(exp), view.type(mask)
    for start in range(0, numel, SCAN_CHUNK):
        count = min(SCAN_CHUNK, numel - start)
        bits = np.frombuffer(raw, dtype=view, count=count, offset=start * view.itemsize)
        magnitude = np.bitwise_and(bits, mask_v)
        if magnitude.size and magnitude.max() < exp_v:  # all finite: the usual case, two passes instead of five
            continue
        nan += int(np.count_nonzero(magnitude > exp_v))
        inf += int(np.count_nonzero(magnitude == exp_v))
    return nan, inf


def _count_float32(values: np.ndarray) -> tuple[int, int]:
    return int(np.count_nonzero(np.isnan(values))), int(np.count_nonzero(np.isinf(values)))


def _count_q8(raw: memoryview, numel: int) -> tuple[int, int]:
    scale = bytes(raw[:4])
    header = DTYPE_BY_NAME["q8"].header_bytes
    nan = inf = 0
    for start in range(0, numel, SCAN_CHUNK):
        count = min(SCAN_CHUNK, numel - start)
        chunk = scale + bytes(raw[header + start : header + start + count])
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is what we count, not a warning
            n, i = _count_float32(quants.dequantize_q8(chunk, count))
        nan, inf = nan + n, inf + i
    return nan, inf


def _count_q4(raw: memoryview, numel: int) -> tuple[int, int]:
    q4 = DTYPE_BY_NAME["q4"]
    step = SCAN_CHUNK // q4.block_values * q4.block_values
    nan = inf = 0
    for start in range(0, numel, step):
        count = min(step, numel - start)
        first = start // q4.block_values * q4.block_bytes
        blocks = -(-count // q4.block_values)
        n, i = _count_float32(quants.dequantize_q4(raw[first : first + blocks * q4.block_bytes], count))
        nan, inf = nan + n, inf + i
    return nan, inf
