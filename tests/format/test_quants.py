"""q4 / q8 dequantization against a per-element reference, legacy dtype codes, unsupported k-quants."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from apr_format import AprWriter, errors, open_apr
from apr_format.quants import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8
from apr_format.validate import validate_file

F16_MIN_NORMAL = 2.0**-14


def reference_q4(raw: bytes, numel: int) -> np.ndarray:
    """Spec: blocks of 32, f16 scale then 16 bytes, value = (nibble - 8) * scale, low nibble first.
    aprender zeroes NaN, Inf and subnormal scales."""
    out = np.zeros(numel, np.float32)
    for i in range(numel):
        block, j = divmod(i, 32)
        base = block * 18
        scale = np.frombuffer(raw[base : base + 2], "<f2")[0].astype(np.float32)
        if not np.isfinite(scale) or abs(scale) < F16_MIN_NORMAL:
            scale = np.float32(0)
        byte = raw[base + 2 + j // 2]
        nibble = byte & 0x0F if j % 2 == 0 else byte >> 4
        out[i] = np.float32(nibble - 8) * scale
    return out


def reference_q8(raw: bytes, numel: int) -> np.ndarray:
    """Spec: one f32 scale, then one int8 per value, value = q * scale."""
    scale = np.frombuffer(raw[:4], "<f4")[0]
    return np.array([np.float32(struct.unpack_from("b", raw, 4 + i)[0]) * scale for i in range(numel)], np.float32)


SPECIAL_F16_SCALES = {
    "nan": 0x7E00, "inf": 0x7C00, "-inf": 0xFC00, "subnormal": 0x0001, "largest subnormal": 0x03FF,
    "-0": 0x8000, "0": 0x0000, "smallest normal": 0x0400, "max": 0x7BFF, "negative": 0xBC00, "one": 0x3C00,
}


@pytest.mark.parametrize("numel", [1, 31, 32, 33, 70, 96])
def test_q4_matches_reference_with_every_special_scale(numel):
    rng = np.random.default_rng(numel)
    blocks = -(-numel // 32)
    raw = bytearray(rng.integers(0, 256, blocks * 18, dtype=np.uint8).tobytes())
    scales = list(SPECIAL_F16_SCALES.values())
    for b in range(blocks):
        struct.pack_into("<H", raw, b * 18, scales[(b + numel) % len(scales)])
    got = dequantize_q4(bytes(raw), numel)
    assert got.dtype == np.float32 and got.shape == (numel,)
    np.testing.assert_array_equal(got, reference_q4(bytes(raw), numel))


@pytest.mark.parametrize("name", sorted(SPECIAL_F16_SCALES))
def test_q4_scale_clamp(name):
    raw = bytearray(struct.pack("<H", SPECIAL_F16_SCALES[name]) + bytes([0x0F, 0xF0] * 8))  # nibbles 15,0,0,15...
    got = dequantize_q4(bytes(raw), 32)
    scale = np.frombuffer(raw[:2], "<f2")[0].astype(np.float32)
    if name in ("nan", "inf", "-inf", "subnormal", "largest subnormal", "-0", "0"):
        assert not np.any(got), name  # zeroed, never NaN
    else:
        assert got[0] == np.float32(7) * scale and got[1] == np.float32(-8) * scale
    assert np.all(np.isfinite(got))


@pytest.mark.parametrize("numel", [0, 1, 5, 300])
@pytest.mark.parametrize("scale", [0.0, 0.01, -3.5, float("nan"), float("inf"), 3e38])
def test_q8_matches_reference(numel, scale):
    rng = np.random.default_rng(numel)
    raw = struct.pack("<f", scale) + rng.integers(-128, 128, numel, dtype=np.int8).tobytes()
    with np.errstate(over="ignore", invalid="ignore"):
        got = dequantize_q8(raw, numel)
        want = reference_q8(raw, numel)
    np.testing.assert_array_equal(got, want)


def test_quantizers_invert_dequantizers():
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 3
    q4 = dequantize_q4(quantize_q4(values), values.size)
    q8 = dequantize_q8(quantize_q8(values), values.size)
    for block in range(0, 1000, 32):  # q4 error at most one step of the block's scale
        chunk = values[block : block + 32]
        step = np.float16(np.abs(chunk).max() / 7).astype(np.float32)
        assert np.abs(q4[block : block + 32] - chunk).max() <= step * 1.001
    assert np.abs(q8 - values).max() <= np.abs(values).max() / 127 / 2 * 1.001
    assert not np.any(dequantize_q4(quantize_q4(np.zeros(40, np.float32)), 40))


def _patch_dtype_codes(path, codes: dict[int, int]) -> None:
    """Rewrite index dtype bytes (e.g. 128 -> legacy 8) and fix the footer CRC (the index is not in the
    header checksum)."""
    buf = bytearray(path.read_bytes())
    count, pos = struct.unpack_from("<I", buf, 8)[0], struct.unpack_from("<Q", buf, 24)[0]
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", buf, pos)
        at = pos + 2 + name_len
        buf[at] = codes.get(buf[at], buf[at])
        pos = at + 2 + 8 * buf[at + 1] + 16
    struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(bytes(buf[:-4])))
    path.write_bytes(bytes(buf))


def test_legacy_codes_8_and_9_read_as_q4_and_q8(tmp_path):
    values = np.linspace(-1, 1, 64, dtype=np.float32)
    path = tmp_path / "legacy.apr"
    with AprWriter(path) as w:
        w.add("a", quantize_q4(values), dtype="q4", shape=(64,))
        w.add("b", quantize_q8(values), dtype="q8", shape=(8, 8))
    with open_apr(path) as f:
        modern = {n: f.to_float32(n) for n in f.keys()}
    _patch_dtype_codes(path, {128: 8, 129: 9})
    assert path.read_bytes().count(bytes([8, 1])) >= 1  # the patch happened: code 8, ndim 1
    with open_apr(path) as f:
        assert (f.info("a").dtype, f.info("b").dtype) == ("q4", "q8")
        for name, want in modern.items():
            np.testing.assert_array_equal(f.to_float32(name), want)
        f.verify()
        rewritten = tmp_path / "rewritten.apr"
        with AprWriter(rewritten, f.metadata, flags=f.flags) as w:
            for info in f.tensors():
                w.add(info.name, bytes(f.raw(info.name)), dtype=info.dtype, shape=info.shape)
    assert validate_file(path).failed == 0
    _patch_dtype_codes(path, {8: 128, 9: 129})  # the writer writes 128 / 129, never 8 / 9
    assert rewritten.read_bytes() == path.read_bytes()


@pytest.mark.parametrize("kind,block_bytes", [("q4_k", 144), ("q6_k", 210)])
def test_k_quants_are_raw_bytes_only(kind, block_bytes, tmp_path):
    raw = bytes(range(256)) * (block_bytes * 2 // 256) + bytes(block_bytes * 2 % 256)
    path = tmp_path / "k.apr"
    with AprWriter(path) as w:
        w.add("k", raw, dtype=kind, shape=(2, 256))
    with open_apr(path) as f:
        assert f.info("k").dtype == kind
        assert bytes(f.raw("k")) == raw and f["k"].dtype == np.uint8
        with pytest.raises(errors.UnsupportedFeature, match=f"dequantizing {kind} is not supported"):
            f.to_float32("k")
    report = validate_file(path)
    assert report.failed == 0
    assert "1 q4_k/q6_k tensors not scanned" in report.checks[-1].detail


def test_validate_scans_dequantized_q8_and_q4(tmp_path):
    path = tmp_path / "q.apr"
    with AprWriter(path) as w:
        w.add("nan_scale", struct.pack("<f", float("nan")) + bytes(10), dtype="q8", shape=(10,))
        w.add("overflow", struct.pack("<f", 3e38) + bytes([127, 0, 1]), dtype="q8", shape=(3,))
        w.add("q4_nan_scale", struct.pack("<H", 0x7E00) + bytes(16), dtype="q4", shape=(32,))
    report = validate_file(path)
    assert [(t.name, t.nan, t.inf) for t in report.nonfinite] == [("nan_scale", 10, 0), ("overflow", 0, 1)]
    assert (report.total_nan, report.total_inf) == (10, 1)
