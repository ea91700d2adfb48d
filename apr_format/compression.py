"""Our zstd extension (flag bit 1): one zstd frame per tensor, index `size` = stored bytes."""

from __future__ import annotations

import os

from .errors import CorruptTensorData, UnsupportedFeature

ZSTD_LEVEL = 3
# The densest zstd block (RLE: 3-byte header + 1 byte) inflates to at most 128 KiB, so no
# frame can grow more than this; a larger claim comes from a corrupt or hostile index.
_MAX_RATIO = 128 * 1024 // 4
# Weights compress a few times at most; a frame claiming more is constant data or a lie, and is
# first inflated into a small reusable buffer to prove it (the claim is only allocated after that).
_PROBE_RATIO = 64
_PROBE_CHUNK = 256 * 1024


def _zstd(path: str | os.PathLike | None):
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - zstandard is a dependency
        raise UnsupportedFeature(path, "zstd-compressed files need the 'zstandard' package") from exc
    return zstandard


def compress(data: memoryview | bytes, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame holding `data`, with its content size recorded."""
    return _zstd(None).ZstdCompressor(level=level, write_content_size=True).compress(data)


def decompress(frame: memoryview | bytes, expected: int, path: str | os.PathLike, name: str) -> bytes:
    """Inflate one tensor's frame; never allocates more than `expected` bytes.

    Raises:
        CorruptTensorData: the frame is not valid zstd or does not inflate to `expected` bytes.
    """
    zstandard = _zstd(path)
    if expected > _MAX_RATIO * len(frame):
        raise CorruptTensorData(path, f"tensor {name!r}: a {len(frame)}-byte zstd frame cannot inflate to {expected} bytes")
    try:
        if not expected:
            return b""
        # python-zstandard allocates the size a frame header declares, ignoring max_output_size.
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, expected):
            raise CorruptTensorData(path, f"tensor {name!r}: zstd frame declares {declared} bytes, expected {expected}")
        if expected > _PROBE_RATIO * len(frame):
            _check_inflated_size(zstandard, frame, expected, path, name)
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CorruptTensorData(path, f"tensor {name!r}: zstd frame is corrupt ({exc})") from exc
    if len(out) != expected:
        raise CorruptTensorData(path, f"tensor {name!r}: zstd frame inflates to {len(out)} bytes, expected {expected}")
    return out


def _check_inflated_size(zstandard, frame: memoryview | bytes, expected: int, path, name: str) -> None:
    """Inflate `frame` chunk by chunk, keeping nothing, and check it holds `expected` bytes."""
    total = 0
    with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
        while total <= expected:
            chunk = reader.read(_PROBE_CHUNK)
            if not chunk:
                break
            total += len(chunk)
    if total > expected:
        raise CorruptTensorData(path, f"tensor {name!r}: zstd frame inflates to more than the expected {expected} bytes")
    if total < expected:
        raise CorruptTensorData(path, f"tensor {name!r}: zstd frame inflates to {total} bytes, expected {expected}")
