"""Float dtype casts on raw little-endian bytes with numpy only (bf16 rounding matches torch)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from apr_format.constants import DTYPE_BY_NAME


def to_float(raw: memoryview | bytes, dtype: str, out: str = "<f4") -> np.ndarray:
    """Values of a flat f32/f16/bf16/f64/int buffer as a new float array (`out` dtype)."""
    if dtype == "bf16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(out, copy=False)
    with np.errstate(over="ignore"):  # f32 -> f16 overflow gives inf, as in torch
        return np.frombuffer(raw, dtype=DTYPE_BY_NAME[dtype].numpy).astype(out)


def cast(raw: memoryview | bytes, src: str, dst: str) -> np.ndarray:
    """A flat array of `dst` values (uint16 bits for bf16) from `src` bytes; round to nearest even."""
    if dst == "bf16":
        return _f32_to_bf16(to_float(raw, src, "<f4"))
    return to_float(raw, src, DTYPE_BY_NAME[dst].numpy)


def cast_chunks(chunks: Iterable[memoryview], src: str, dst: str, numel: int) -> np.ndarray:
    """`cast()` of a tensor given as byte chunks (whole elements each), into one preallocated
    array: peak memory is the output plus one chunk's temporaries."""
    out = np.empty(numel, dtype=DTYPE_BY_NAME[dst].numpy)  # bf16: its uint16 bits
    cursor = 0
    for chunk in chunks:
        values = cast(chunk, src, dst)
        out[cursor : cursor + values.size] = values
        cursor += values.size
    return out


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    bits = values.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0xFFFF  # what torch's CPU cast writes for every NaN
    return rounded
