"""Dequantization of APR's own block formats (q4, q8) to float32, whole blocks at a time."""

from __future__ import annotations

import numpy as np

from .constants import DTYPE_BY_NAME

# aprender zeroes NaN/Inf/subnormal q4 scales (its GH-186 fix); match it bit for bit.
_F16_MIN_NORMAL = 6.103515625e-05


def dequantize_q8(raw: memoryview | bytes, numel: int) -> np.ndarray:
    """q8: one little-endian f32 scale, then one int8 per value (value = q * scale)."""
    scale = np.frombuffer(raw, dtype="<f4", count=1)[0]
    q = np.frombuffer(raw, dtype=np.int8, count=numel, offset=4)
    return q.astype(np.float32) * np.float32(scale)


def dequantize_q4(raw: memoryview | bytes, numel: int) -> np.ndarray:
    """q4: blocks of 32 values, f16 scale + 16 nibble bytes, value = (nibble - 8) * scale.

    Element i of a block sits in byte i // 2, low nibble for even i (aprender's layout).
    """
    block = DTYPE_BY_NAME["q4"]
    blocks = -(-numel // block.block_values)
    data = np.frombuffer(raw, dtype=np.uint8, count=blocks * block.block_bytes).reshape(blocks, block.block_bytes)
    scales = data[:, :2].copy().view("<f2").astype(np.float32)
    scales[~np.isfinite(scales) | (np.abs(scales) < _F16_MIN_NORMAL)] = 0.0
    nibbles = np.empty((blocks, 32), dtype=np.int8)
    nibbles[:, 0::2] = data[:, 2:] & 0x0F
    nibbles[:, 1::2] = data[:, 2:] >> 4
    values = (nibbles.astype(np.float32) - 8.0) * scales
    return values.reshape(-1)[:numel]


def quantize_q8(values: np.ndarray) -> bytes:
    """Symmetric per-tensor q8 (scale = max|x| / 127), for tests and tools."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    amax = float(np.abs(flat).max()) if flat.size else 0.0
    scale = np.float32(amax / 127.0) if amax else np.float32(1.0)
    q = np.clip(np.rint(flat / scale), -127, 127).astype(np.int8)
    return scale.astype("<f4").tobytes() + q.tobytes()


def quantize_q4(values: np.ndarray) -> bytes:
    """Symmetric q4 blocks of 32 (scale = max|x| / 7), inverse of `dequantize_q4`."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    blocks = -(-flat.size // 32)
    padded = np.zeros(blocks * 32, dtype=np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, 32)
    scales = (np.abs(padded).max(axis=1) / 7.0).astype(np.float16)
    inv = np.divide(1.0, scales.astype(np.float32), out=np.zeros(blocks, np.float32), where=scales != 0)
    q = (np.clip(np.rint(padded * inv[:, None]), -8, 7) + 8).astype(np.uint8)
    out = np.empty((blocks, 18), dtype=np.uint8)
    out[:, :2] = scales.astype("<f2").view(np.uint8).reshape(blocks, 2)
    out[:, 2:] = q[:, 0::2] | (q[:, 1::2] << 4)
    return out.tobytes()
