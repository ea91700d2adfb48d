"""Write -> read round trips of the writer: every dtype, edge shapes, metadata, zstd, lazy sources, errors."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from apr_format import AprWriter, Flag, errors, open_apr, save_apr
from apr_format.quants import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8
from apr_format.validate import validate_file

RNG = np.random.default_rng(1234)
NUMPY_DTYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i32": np.int32, "i64": np.int64,
                "i8": np.int8, "u8": np.uint8}


def _values(dtype, shape):
    if np.issubdtype(dtype, np.floating):
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


def _contents(tmp_path) -> list[str]:
    return sorted(os.listdir(tmp_path))


@pytest.mark.parametrize("name", sorted(NUMPY_DTYPES))
def test_numpy_dtypes_round_trip(name, tmp_path):
    arr = _values(NUMPY_DTYPES[name], (3, 5, 7))
    save_apr(tmp_path / "m.apr", {"t": arr})
    with open_apr(tmp_path / "m.apr") as f:
        info = f.info("t")
        assert (info.dtype, info.shape, info.nbytes) == (name, (3, 5, 7), arr.nbytes)
        assert bytes(f.raw("t")) == arr.tobytes()
        assert f["t"].dtype == arr.dtype and np.array_equal(f["t"], arr)
        assert np.array_equal(f.to_float32("t"), arr.astype(np.float32))
        assert torch.equal(f.torch("t"), torch.from_numpy(arr))


def test_big_endian_input_is_stored_little_endian(tmp_path):
    arr = np.arange(6, dtype=">f4").reshape(2, 3)
    save_apr(tmp_path / "m.apr", {"t": arr})
    with open_apr(tmp_path / "m.apr") as f:
        assert bytes(f.raw("t")) == arr.astype("<f4").tobytes()


def test_bf16_via_torch_and_via_uint16(tmp_path):
    t = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    bits = t.view(torch.int16).numpy().view(np.uint16)
    save_apr(tmp_path / "a.apr", {"t": t})
    with AprWriter(tmp_path / "b.apr") as w:
        w.add("t", bits, dtype="bf16")
    assert (tmp_path / "a.apr").read_bytes() == (tmp_path / "b.apr").read_bytes()
    with open_apr(tmp_path / "a.apr") as f:
        assert f.info("t").dtype == "bf16"
        assert f.bits("t").dtype == np.uint16 and np.array_equal(f.bits("t"), bits)
        assert f["t"].dtype == ml_dtypes.bfloat16 and np.array_equal(f["t"].astype(np.float32), t.float().numpy())
        back = f.torch("t")
        assert back.dtype == torch.bfloat16 and torch.equal(back, t)
        assert np.array_equal(f.to_float32("t"), t.float().numpy())


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_quantized_round_trip(kind, tmp_path):
    values = RNG.standard_normal((5, 40)).astype(np.float32)
    packed = (quantize_q4 if kind == "q4" else quantize_q8)(values)
    with AprWriter(tmp_path / "q.apr") as w:
        w.add("q", packed, dtype=kind, shape=values.shape)
    with open_apr(tmp_path / "q.apr") as f:
        assert Flag.QUANTIZED in f.flags
        info = f.info("q")
        assert (info.dtype, info.shape, info.size) == (kind, (5, 40), len(packed))
        assert bytes(f.raw("q")) == packed
        expected = (dequantize_q4 if kind == "q4" else dequantize_q8)(packed, values.size).reshape(5, 40)
        assert np.array_equal(f.to_float32("q"), expected)
        assert np.abs(expected - values).max() < np.abs(values).max() / (7 if kind == "q4" else 127)
        assert torch.equal(f.torch("q"), torch.from_numpy(expected))


def test_edge_shapes_names_and_metadata(tmp_path):
    tensors = {
        "empty": np.zeros((0, 4), np.float32),
        "empty.bf16": np.zeros((3, 0), np.uint16),
        "one": np.array([3.5], np.float32),
        "scalar": np.array(7, np.int64),
        "eight.dims": np.arange(256, dtype=np.float16).reshape((2,) * 8),
        "ünïcödé/名字/🙂": np.ones(3, np.float32),
        "space and\ttab": np.ones(2, np.int8),
        "x" * 256: np.ones(1, np.uint8),
    }
    metadata = {"architecture": "llama", "custom": {"nested": [1, 2.5, "ü", None, {"deep": True}]},
                "unicode": "日本語", "big": 2**64 - 1, "dropped": None}
    with AprWriter(tmp_path / "m.apr", metadata) as w:
        for name, arr in tensors.items():
            w.add(name, arr, dtype="bf16" if name == "empty.bf16" else None)
    with open_apr(tmp_path / "m.apr") as f:
        assert f.keys() == sorted(tensors, key=lambda n: n.encode("utf-8"))
        assert f.metadata == {k: v for k, v in metadata.items() if v is not None}
        for name, arr in tensors.items():
            assert f[name].shape == arr.shape
            assert bytes(f.raw(name)) == arr.tobytes()
        assert f.info("empty").offset == f.info("empty.bf16").offset  # empty tensors take no room
    assert validate_file(tmp_path / "m.apr").failed == 0


def test_same_content_twice_gives_identical_files(tmp_path):
    tensors = {f"layer.{i}": _values(np.float32, (8, 8)) for i in range(5)}
    tensors["q"] = quantize_q8(np.ones(9, np.float32))
    for out in ("a.apr", "b.apr"):
        with AprWriter(tmp_path / out, {"k": [1, 2], "name": "x"}) as w:
            for name in reversed(list(tensors)):  # insertion order must not matter
                arr = tensors[name]
                w.add(name, arr, dtype="q8" if name == "q" else None, shape=(9,) if name == "q" else None)
    assert (tmp_path / "a.apr").read_bytes() == (tmp_path / "b.apr").read_bytes()


def test_zstd_round_trip(tmp_path):
    tensors = {"a": np.zeros((64, 64), np.float32), "b": _values(np.int32, (10,)),
               "c": np.zeros((0,), np.float32), "d": torch.ones(3, 3, dtype=torch.bfloat16)}
    save_apr(tmp_path / "plain.apr", tensors, {"m": 1})
    save_apr(tmp_path / "z.apr", tensors, {"m": 1}, compression="zstd")
    with open_apr(tmp_path / "plain.apr") as plain, open_apr(tmp_path / "z.apr") as z:
        assert Flag.ZSTD in z.flags and Flag.ZSTD not in plain.flags
        assert z.keys() == plain.keys() and z.metadata == plain.metadata
        for name in plain.keys():
            assert bytes(z.raw(name)) == bytes(plain.raw(name))
            assert z.info(name).nbytes == plain.info(name).nbytes
        assert z.info("a").size < z.info("a").nbytes  # really compressed
        z.verify()
    report = validate_file(tmp_path / "z.apr")
    assert report.failed == 0 and "zstd frames" in [c.name for c in report.checks]


def test_lazy_sources_are_called_once_at_write_time(tmp_path):
    calls = []

    def source(i):
        def produce():
            calls.append(i)
            return np.full((4, 4), i, np.float32)
        return produce

    w = AprWriter(tmp_path / "lazy.apr")
    for i in range(3):
        w.add(f"t{i}", source(i), dtype="f32", shape=(4, 4))
    assert calls == [] and not (tmp_path / "lazy.apr").exists()
    w.close()
    assert calls == [0, 1, 2]
    with open_apr(tmp_path / "lazy.apr") as f:
        assert [float(f[f"t{i}"][0, 0]) for i in range(3)] == [0.0, 1.0, 2.0]


def test_writer_argument_errors(tmp_path):
    w = AprWriter(tmp_path / "e.apr")
    w.add("a", np.zeros(2, np.float32))
    with pytest.raises(errors.InvalidArgument, match="added twice"):
        w.add("a", np.zeros(2, np.float32))
    with pytest.raises(errors.UnknownDType, match="unknown dtype 'f8'"):
        w.add("b", b"\0" * 8, dtype="f8", shape=(1,))
    with pytest.raises(errors.InvalidArgument, match="do not hold f32"):
        w.add("c", b"\0" * 7, dtype="f32", shape=(2,))
    with pytest.raises(errors.UnknownDType, match="complex64"):
        w.add("d", np.zeros(2, np.complex64))
    with pytest.raises(errors.InvalidArgument, match="ndim <= 8"):
        w.add("e", np.zeros((1,) * 9, np.float32))
    with pytest.raises(errors.InvalidArgument, match="ndim <= 8"):
        w.add("e", lambda: None, dtype="f32", shape=(1,) * 9)
    with pytest.raises(errors.InvalidArgument, match="too large for any array"):
        w.add("e", b"", dtype="f32", shape=(0, 2**62))
    with pytest.raises(errors.InvalidArgument, match="too large for any array"):
        w.add("e", lambda: None, dtype="u8", shape=(2**64,))
    with pytest.raises(errors.InvalidArgument, match="1..256"):
        w.add("x" * 257, np.zeros(1, np.float32))
    with pytest.raises(errors.InvalidArgument, match="1..256"):
        w.add("", np.zeros(1, np.float32))
    with pytest.raises(errors.InvalidArgument, match="lazy source needs dtype and shape"):
        w.add("f", lambda: np.zeros(1, np.float32))
    with pytest.raises(errors.InvalidArgument, match="unknown compression"):
        AprWriter(tmp_path / "x.apr", compression="lz4")
    w.abort()
    assert _contents(tmp_path) == []


def test_metadata_that_is_not_json_is_refused(tmp_path):
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for bad in ({"s": {1, 2}}, {"nan": float("nan")}, {"deep": deep}):
        with pytest.raises(errors.InvalidArgument, match="metadata is not JSON"):
            save_apr(tmp_path / "m.apr", {"a": np.zeros(1, np.float32)}, bad)
    assert _contents(tmp_path) == []


@pytest.mark.parametrize("failure", ["raises", "wrong shape"])
def test_failing_lazy_source_leaves_nothing_behind(failure, tmp_path):
    dest = tmp_path / "out.apr"
    dest.write_bytes(b"previous content")

    def bad():
        if failure == "raises":
            raise RuntimeError("source exploded")
        return np.zeros((3, 3), np.float32)

    w = AprWriter(dest)
    w.add("a", np.ones(1000, np.float32))
    w.add("b", bad, dtype="f32", shape=(2, 2))
    expected = RuntimeError if failure == "raises" else errors.InvalidArgument
    with pytest.raises(expected):
        w.close()
    assert dest.read_bytes() == b"previous content"
    assert _contents(tmp_path) == ["out.apr"]


def test_exception_inside_with_block_writes_nothing(tmp_path):
    with pytest.raises(KeyError):
        with AprWriter(tmp_path / "m.apr") as w:
            w.add("a", np.zeros(1, np.float32))
            raise KeyError("caller bug")
    assert _contents(tmp_path) == []


def test_reading_refuses_nan_metadata_written_by_someone_else(tmp_path):
    # Python's json accepts NaN/Infinity; JSON (aprender, our writer) does not, so neither does the reader.
    save_apr(tmp_path / "m.apr", {"a": np.zeros(1, np.float32)}, {"x": 1.5})
    raw = bytearray((tmp_path / "m.apr").read_bytes())
    at = raw.index(b"1.5")
    raw[at : at + 3] = b"NaN"
    (tmp_path / "m.apr").write_bytes(bytes(raw))
    with pytest.raises(errors.CorruptMetadata, match="not valid UTF-8 JSON"):
        open_apr(tmp_path / "m.apr")


def test_written_file_gets_the_usual_permissions(tmp_path):
    save_apr(tmp_path / "m.apr", {"a": np.zeros(1, np.float32)})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.apr").stat().st_mode & 0o777 == 0o666 & ~mask
