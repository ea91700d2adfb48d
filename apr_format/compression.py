"""Our zstd extension (flag bit 1): one zstd frame per tensor, index `size` = stored bytes."""

from __future__ import annotations

import os

from .errors import CorruptIndex, UnsupportedFeature

ZSTD_LEVEL = 3
# The densest zstd block (RLE: 3-byte header + 1 byte) inflates to at most 128 KiB, so no
# frame can grow more than this; a larger claim comes from a corrupt or hostile index.
_MAX_RATIO = 128 * 1024 // 4


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
        CorruptIndex: the frame is not valid zstd or does not inflate to `expected` bytes.
    """
    zstandard = _zstd(path)
    if expected > _MAX_RATIO * len(frame):
        raise CorruptIndex(path, f"tensor {name!r}: a {len(frame)}-byte zstd frame cannot inflate to {expected} bytes")
    try:
        if not expected:
            return b""
        # python-zstandard allocates the size a frame header declares, ignoring max_output_size.
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared not in (zstandard.CONTENTSIZE_UNKNOWN, expected):
            raise CorruptIndex(path, f"tensor {name!r}: zstd frame declares {declared} bytes, expected {expected}")
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=expected)
    except zstandard.ZstdError as exc:
        raise CorruptIndex(path, f"tensor {name!r}: zstd frame is corrupt ({exc})") from exc
    if len(out) != expected:
        raise CorruptIndex(path, f"tensor {name!r}: zstd frame inflates to {len(out)} bytes, expected {expected}")
    return out
