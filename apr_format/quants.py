"""APR's own quantized formats (q4, q8): packing as aprender packs them and dequantization to float32, whole blocks at a time."""

from __future__ import annotations

import numpy as np

from .constants import DTYPE_BY_NAME
from .errors import NotQuantizable

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


def quantize_q8(values: np.ndarray, where: str | None = None) -> bytes:
    """aprender's q8 (`AprV2Writer::add_q8_tensor`): scale = max|x| / 127 (1.0 for an all-zero
    tensor), q = round(x / scale) with ties away from zero, clamped to [-127, 127].

    Raises:
        NotQuantizable: NaN or Inf among the values.
    """
    flat = _finite(values, where)
    amax = np.abs(flat).max() if flat.size else np.float32(0)
    scale = amax / np.float32(127) if amax else np.float32(1)  # an empty tensor: just the scale (4 + n bytes)
    q = np.clip(_round_half_away(flat / scale), -127, 127).astype(np.int8)
    return scale.astype("<f4").tobytes() + q.tobytes()


def quantize_q4(values: np.ndarray, where: str | None = None) -> bytes:
    """aprender's q4 (`AprV2Writer::add_q4_tensor`), whole blocks at once: per block of 32,
    scale = max|x| / 7 in f32 (1.0 for an all-zero block), stored as f16; q = round(x / scale)
    (f32 scale, ties away from zero) clamped to [-8, 7], nibble q + 8; the tail of a last
    partial block is zero bytes.

    Raises:
        NotQuantizable: NaN or Inf among the values, or a block whose scale overflows f16.
    """
    flat = _finite(values, where)
    block = DTYPE_BY_NAME["q4"]
    blocks = -(-flat.size // block.block_values)
    padded = np.zeros(blocks * block.block_values, dtype=np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, block.block_values)
    amax = np.abs(padded).max(axis=1)
    scales = np.where(amax > 0, amax / np.float32(7), np.float32(1)).astype(np.float32)
    with np.errstate(over="ignore"):
        stored = scales.astype("<f2")
    if not np.all(np.isfinite(stored)):
        worst = float(amax[~np.isfinite(stored)].max())
        raise NotQuantizable(where, f"a q4 block holds |x| = {worst:g}, beyond what an f16 scale can hold (7 x 65504)")
    q = (np.clip(_round_half_away(padded / scales[:, None]), -8, 7) + 8).astype(np.uint8)
    q.reshape(-1)[flat.size :] = 0
    out = np.empty((blocks, block.block_bytes), dtype=np.uint8)
    out[:, :2] = stored.view(np.uint8).reshape(blocks, 2)
    out[:, 2:] = q[:, 0::2] | (q[:, 1::2] << 4)
    return out.tobytes()


def _finite(values: np.ndarray, where: str | None) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    bad = int(np.count_nonzero(~np.isfinite(flat)))
    if bad:
        raise NotQuantizable(where, f"{bad} of {flat.size} values are NaN or Inf; they cannot be quantized")
    return flat


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """Rust's f32::round (ties away from zero), exactly: numpy's rint rounds ties to even."""
    magnitude = np.abs(x)
    whole = np.floor(magnitude)
    return np.copysign(whole + (magnitude - whole >= 0.5), x)


def q4_to_ggml_q4_0(raw: memoryview | bytes, numel: int) -> np.ndarray:
    """The same values as GGML Q4_0 blocks (uint8, 18 bytes each): the f16 scale stays, the
    nibbles move from APR's order (element i in byte i // 2, low nibble first) to GGML's
    (element i in byte i % 16, low nibbles hold 0..15). Scales aprender's reader zeroes
    (NaN, Inf, subnormal) are written as 0, so both decode to exactly the same floats."""
    block = DTYPE_BY_NAME["q4"]
    blocks = -(-numel // block.block_values)
    data = np.frombuffer(raw, dtype=np.uint8, count=blocks * block.block_bytes).reshape(blocks, block.block_bytes)
    scales = data[:, :2].copy().view("<f2")
    scales[~np.isfinite(scales) | (np.abs(scales.astype(np.float32)) < _F16_MIN_NORMAL)] = 0
    nibbles = np.empty((blocks, 32), dtype=np.uint8)
    nibbles[:, 0::2] = data[:, 2:] & 0x0F
    nibbles[:, 1::2] = data[:, 2:] >> 4
    out = np.empty_like(data)
    out[:, :2] = scales.view(np.uint8)
    out[:, 2:] = nibbles[:, :16] | (nibbles[:, 16:] << 4)
    return out
