"""Property tests: any mix of tensors, names and metadata survives write -> read unchanged and validates."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apr_format import AprWriter, Flag, open_apr
from apr_format.quants import quantize_q4, quantize_q8
from apr_format.validate import validate_file

PLAIN = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i32": np.int32, "i64": np.int64,
         "i8": np.int8, "u8": np.uint8}
DTYPES = sorted(PLAIN) + ["bf16", "q4", "q8"]

# 1..256 UTF-8 bytes, any characters a str can hold in a file (no lone surrogates).
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda n: len(n.encode("utf-8")) <= 256
)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
metadata = st.dictionaries(st.text(max_size=12), json_values, max_size=6)
tensor_specs = st.dictionaries(names, st.tuples(st.sampled_from(DTYPES), shapes, st.integers(0, 2**32 - 1)),
                               max_size=6)


def _payload(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray | bytes:
    """Finite random values of `dtype` (quantized types as their packed bytes)."""
    rng = np.random.default_rng(seed)
    numel = int(np.prod(shape, dtype=np.int64))
    if dtype in ("f32", "f16", "f64"):
        return rng.standard_normal(shape).astype(PLAIN[dtype])
    if dtype == "bf16":
        return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    if dtype in ("q4", "q8"):
        return (quantize_q4 if dtype == "q4" else quantize_q8)(rng.standard_normal(numel).astype(np.float32))
    info = np.iinfo(PLAIN[dtype])
    return rng.integers(info.min, info.max, size=shape, dtype=PLAIN[dtype], endpoint=True)


def _as_bytes(data: np.ndarray | bytes) -> bytes:
    return data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=tensor_specs, meta=metadata, compression=st.sampled_from([None, "zstd"]))
def test_round_trip_identity(specs, meta, compression):
    payloads = {name: _payload(dtype, shape, seed) for name, (dtype, shape, seed) in specs.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.apr"
        with AprWriter(path, meta, compression=compression) as w:
            for name, (dtype, shape, _) in specs.items():
                w.add(name, payloads[name], dtype=dtype, shape=shape)
        with open_apr(path) as f:
            assert f.keys() == sorted(specs, key=lambda n: n.encode("utf-8"))
            assert f.metadata == {k: v for k, v in meta.items() if v is not None}
            assert bool(f.flags & Flag.ZSTD) == (compression == "zstd")
            assert bool(f.flags & Flag.QUANTIZED) == any(d in ("q4", "q8") for d, _, _ in specs.values())
            for name, (dtype, shape, _) in specs.items():
                info = f.info(name)
                assert (info.dtype, info.shape) == (dtype, shape)
                assert bytes(f.raw(name)) == _as_bytes(payloads[name])
                assert f.to_float32(name).shape == shape
            f.verify()
        report = validate_file(path)
        assert report.failed == 0, report.checks
        assert report.total_tensors == len(specs)
        first = path.read_bytes()
        with AprWriter(path, meta, compression=compression) as w:  # again, reversed: same bytes
            for name, (dtype, shape, _) in reversed(list(specs.items())):
                w.add(name, payloads[name], dtype=dtype, shape=shape)
        assert path.read_bytes() == first


@settings(max_examples=50, deadline=None)
@given(dtype=st.sampled_from(["f16", "bf16", "f32", "f64"]), numel=st.integers(1, 300), data=st.data())
def test_validate_counts_exactly_the_nans_and_infs_planted(dtype, numel, data):
    spots = data.draw(st.lists(st.tuples(st.integers(0, numel - 1), st.sampled_from(["nan", "inf", "-inf"])),
                               max_size=10, unique_by=lambda s: s[0]))
    values = np.linspace(-2, 2, numel, dtype=np.float32)
    for at, what in spots:
        values[at] = float(what)
    if dtype == "bf16":
        payload = (values.view(np.uint32) >> 16).astype(np.uint16)
    else:
        payload = values.astype({"f16": np.float16, "f32": np.float32, "f64": np.float64}[dtype])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.apr"
        with AprWriter(path) as w:
            w.add("t", payload, dtype=dtype)
            w.add("clean", np.ones(3, np.float32))
        report = validate_file(path)
    nan = sum(w == "nan" for _, w in spots)
    inf = len(spots) - nan
    assert (report.total_nan, report.total_inf) == (nan, inf)
    assert [(t.name, t.nan, t.inf) for t in report.nonfinite] == ([("t", nan, inf)] if spots else [])
    assert {c.name: c.status for c in report.checks}["nan/inf"] == ("FAIL" if spots else "PASS")
