"""q4 / q8 packing and dequantization against per-element references (aprender's loops), legacy codes, k-quants."""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib

import numpy as np
import pytest

from apr_format import AprWriter, errors, open_apr
from apr_format.quants import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8
from apr_testing import GOLDEN
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


def _round_away(x: np.float32) -> int:
    """Rust's f32::round: ties away from zero (exact: an f32 plus 0.5 is exact in float64)."""
    return int(math.copysign(math.floor(abs(float(x)) + 0.5), float(x)))


def aprender_q8(values: np.ndarray) -> bytes:
    """AprV2Writer::add_q8_tensor, element by element as the Rust loop does it."""
    flat = [np.float32(v) for v in np.asarray(values, np.float32).reshape(-1)]
    max_abs = max((abs(v) for v in flat), default=np.float32(0))
    scale = np.float32(1) if max_abs == 0 else np.float32(max_abs / np.float32(127))
    out = bytearray(struct.pack("<f", scale))
    for v in flat:
        out += struct.pack("b", min(127, max(-127, _round_away(np.float32(v / scale)))))
    return bytes(out)


def aprender_q4(values: np.ndarray) -> bytes:
    """AprV2Writer::add_q4_tensor, block by block and element by element."""
    flat = np.asarray(values, np.float32).reshape(-1)
    out = bytearray()
    for start in range(0, flat.size, 32):
        block = flat[start : start + 32]
        max_abs = np.float32(np.abs(block).max())
        scale = np.float32(1) if max_abs == 0 else np.float32(max_abs / np.float32(7))
        out += np.float16(scale).astype("<f2").tobytes()
        packed = bytearray(16)
        for i, v in enumerate(block):
            nibble = (min(7, max(-8, _round_away(np.float32(v / scale)))) + 8) & 0x0F
            packed[i // 2] |= nibble if i % 2 == 0 else nibble << 4
        out += packed
    return bytes(out)


# Values with exact .5 ties (rint rounds them to even, aprender away from zero), zeros, a lone
# outlier, tiny magnitudes, odd lengths that end in a partial q4 block.
PACK_CASES = {
    "ties": np.array([0.5, 1.5, 2.5, -2.5, -0.5, 3.5, 7.0, -7.0] * 5, np.float32),
    "normal": np.random.default_rng(1).standard_normal(333).astype(np.float32),
    "outlier": np.concatenate([np.full(40, 0.01, np.float32), [50.0]]).astype(np.float32),
    "zeros": np.zeros(70, np.float32),
    "tiny": (np.random.default_rng(2).standard_normal(64) * 1e-5).astype(np.float32),
    "one": np.array([-3.0], np.float32),
}


@pytest.mark.parametrize("case", sorted(PACK_CASES))
def test_packing_is_aprenders_byte_for_byte(case):
    values = PACK_CASES[case]
    assert quantize_q8(values) == aprender_q8(values)
    assert quantize_q4(values) == aprender_q4(values)


def test_ties_round_away_from_zero_like_rust():
    values = np.array([2.5, -2.5, 0.5, 7.0], np.float32)  # scale 1.0: q = 2.5 -> 3 (rint would give 2)
    q4 = np.frombuffer(quantize_q4(values), np.uint8)
    assert [q4[2] & 0x0F, q4[2] >> 4, q4[3] & 0x0F, q4[3] >> 4] == [3 + 8, -3 + 8, 1 + 8, 7 + 8]


@pytest.mark.parametrize("case", sorted(PACK_CASES))
def test_packed_values_decode_within_half_a_step(case):
    """Decoded by the independent per-element readers above: q8 within half a step of its one
    scale; q4 within half a step of each block's stored f16 scale plus that scale's rounding."""
    values = PACK_CASES[case]
    q8 = reference_q8(quantize_q8(values), values.size)
    scale8 = np.abs(values).max() / 127 if np.any(values) else 1.0
    assert np.abs(q8 - values).max() <= scale8 / 2 * (1 + 1e-6)
    raw = quantize_q4(values)
    q4 = reference_q4(raw, values.size)
    for b, start in enumerate(range(0, values.size, 32)):
        block = values[start : start + 32]
        exact = np.abs(block).max() / 7
        stored = np.frombuffer(raw[b * 18 : b * 18 + 2], "<f2")[0].astype(np.float64)
        bound = exact / 2 + 8 * abs(stored - exact) if stored >= F16_MIN_NORMAL else np.abs(block).max()
        assert np.abs(q4[start : start + 32] - block).max() <= bound * (1 + 1e-6) + 1e-12, (case, b)


@pytest.mark.parametrize("name", ["tiny-llama.apr", "tiny-qwen2.apr"])
def test_golden_models_quantize_within_bounds_of_their_expected_sums(name):
    """Every float tensor of a golden model, packed and decoded by the per-element readers: the
    decoded sum stays within n x half a step of expected.json's sum_f32."""
    expected = json.loads((GOLDEN / "expected.json").read_text())[name]["tensors"]
    with open_apr(GOLDEN / name) as f:
        for tensor, want in expected.items():
            values = f.to_float32(tensor).reshape(-1)
            assert hashlib.sha256(f.raw(tensor)).hexdigest() == want["sha256"]
            for pack, decode, step in ((quantize_q8, reference_q8, 127), (quantize_q4, reference_q4, 7)):
                decoded = decode(pack(values), values.size).astype(np.float64)
                half_step = np.abs(values).max() / step / 2 * 1.01 + 1e-6
                assert abs(decoded.sum() - want["sum_f32"]) <= values.size * half_step, (tensor, step)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused(bad):
    values = np.array([1.0, bad, 2.0], np.float32)
    for pack in (quantize_q8, quantize_q4):
        with pytest.raises(errors.NotQuantizable, match=r"^m.apr: tensor 'w': 1 of 3 values are NaN or Inf"):
            pack(values, where="m.apr: tensor 'w'")


def test_q4_scale_beyond_f16_is_refused():
    with pytest.raises(errors.NotQuantizable, match=r"\|x\| = 1e\+06, beyond what an f16 scale can hold"):
        quantize_q4(np.array([1e6, 1.0], np.float32))


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
