"""Mutation fuzzing: broken and hostile files give AprError subclasses only, never another exception.

APR_FUZZ_CASES sets the number of cases (default 300; `make fuzz` runs 100000). Every case is
seeded by its number, so a failure names the seeds that reproduce it: APR_FUZZ_SEED=<n> runs one.
"""

from __future__ import annotations

import os
import random
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard

from apr_format import AprError, AprWriter, errors, open_apr, save_apr
from apr_format.constants import HEADER_SIZE
from apr_format.header import header_checksum
from apr_format.quants import quantize_q4, quantize_q8
from apr_format.validate import ValidationReport, validate_file
from apr_testing import GOLDEN

CASES = int(os.environ.get("APR_FUZZ_CASES", "300"))
ONLY_SEED = os.environ.get("APR_FUZZ_SEED")
MEMORY_EVERY = 10  # tracemalloc check on every 10th case (it slows reading down)
INTERESTING_U64 = (0, 1, 7, 63, 64, 65, 255, 256, 257, 2**16 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63,
                   2**64 - 64, 2**64 - 1)
_HEADER = struct.Struct("<4sBBHIQIQQI")
# header field -> (byte offset, struct code)
HEADER_FIELDS = {"version_major": (4, "B"), "version_minor": (5, "B"), "flags": (6, "H"), "tensor_count": (8, "I"),
                 "metadata_offset": (12, "Q"), "metadata_size": (20, "I"), "tensor_index_offset": (24, "Q"),
                 "data_offset": (32, "Q")}


# -- base files ---------------------------------------------------------------------------
def _fresh(path: Path, compression: str | None) -> Path:
    rng = np.random.default_rng(7)
    with AprWriter(path, {"architecture": "llama", "num_layers": 1, "nested": {"a": [1, 2, {"b": None}]}},
                   compression=compression) as w:
        w.add("a.f32", rng.standard_normal((4, 5)).astype(np.float32))
        w.add("b.bf16", rng.integers(0, 2**16, (3, 7), dtype=np.uint16), dtype="bf16")
        w.add("c.f16", rng.standard_normal(9).astype(np.float16))
        w.add("d.q4", quantize_q4(rng.standard_normal(70).astype(np.float32)), dtype="q4", shape=(70,))
        w.add("e.q8", quantize_q8(rng.standard_normal(33).astype(np.float32)), dtype="q8", shape=(3, 11))
        w.add("f.i64", np.arange(5, dtype=np.int64))
        w.add("g.empty", np.zeros((0, 3), np.float64))
        w.add("h.q4k", bytes(range(144)), dtype="q4_k", shape=(256,))
    return path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[tuple[str, bytes]]:
    folder = tmp_path_factory.mktemp("bases")
    files = [GOLDEN / "all-dtypes.apr", GOLDEN / "tiny-qwen2.apr", GOLDEN / "tiny-llama.apr",
             _fresh(folder / "fresh.apr", None), _fresh(folder / "fresh-zstd.apr", "zstd")]
    return [(p.name, p.read_bytes()) for p in files]


# -- layout knowledge used to aim mutations -----------------------------------------------
def _entry_fields(data: bytes) -> list[dict[str, tuple[int, str]]]:
    """Byte position and struct code of each field of each index entry, as far as the index parses."""
    entries: list[dict[str, tuple[int, str]]] = []
    try:
        (_, _, _, _, count, _, _, pos, _, _) = _HEADER.unpack_from(data, 0)
        for _ in range(min(count, 10_000)):
            (name_len,) = struct.unpack_from("<H", data, pos)
            dtype_at, ndim = pos + 2 + name_len, data[pos + 2 + name_len + 1]
            fields = {"name_len": (pos, "H"), "dtype": (dtype_at, "B"), "ndim": (dtype_at + 1, "B"),
                      "offset": (dtype_at + 2 + 8 * ndim, "Q"), "size": (dtype_at + 10 + 8 * ndim, "Q"),
                      "name": (pos + 2, f"{name_len}s")}
            for d in range(ndim):
                fields[f"dim{d}"] = (dtype_at + 2 + 8 * d, "Q")
            pos = dtype_at + 2 + 8 * ndim + 16
            if pos > len(data):
                break
            entries.append(fields)
    except (struct.error, IndexError):
        pass
    return entries


def _fix_header_crc(buf: bytearray) -> None:
    if len(buf) >= HEADER_SIZE:
        struct.pack_into("<I", buf, 40, header_checksum(bytes(buf[:HEADER_SIZE])))


def _fix_footer_crc(buf: bytearray) -> None:
    if len(buf) >= 4:
        struct.pack_into("<I", buf, len(buf) - 4, zlib.crc32(bytes(buf[:-4])))


def _value(rng: random.Random, bits: int, current: int | None = None, others: list[int] = ()) -> int:
    choice = rng.random()
    if choice < 0.5:
        v = rng.choice(INTERESTING_U64)
    elif choice < 0.7 and others:
        v = rng.choice(others)
    elif choice < 0.85 and current is not None:
        v = current + rng.choice((-65, -64, -1, 1, 63, 64, 4096))
    else:
        v = rng.getrandbits(bits)
    return v % (1 << bits)


# -- mutations: each takes (rng, bytearray of a valid file) and returns a description -------
def flip_bytes(rng: random.Random, buf: bytearray) -> str:
    if not buf:
        return "flip nothing (empty)"
    # Aim mostly at header, metadata and index (before data_offset): data flips only hit the CRC.
    structural = struct.unpack_from("<Q", buf, 32)[0] if len(buf) >= 40 else len(buf)
    spots = []
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(max(1, min(structural, len(buf)))) if rng.random() < 0.8 else rng.randrange(len(buf))
        buf[at] = rng.randrange(256) if rng.random() < 0.5 else buf[at] ^ (1 << rng.randrange(8))
        spots.append(at)
    return f"flip bytes at {spots}"


def truncate(rng: random.Random, buf: bytearray) -> str:
    keep = max(0, rng.choice((0, 1, 3, 4, 40, 63, 64, 65, rng.randrange(len(buf) + 1), len(buf) - 1, len(buf) - 4)))
    del buf[keep:]
    return f"truncate to {keep}"


def splice(rng: random.Random, buf: bytearray) -> str:
    at, n = rng.randrange(len(buf) + 1), rng.randint(1, 200)
    if rng.random() < 0.5:
        buf[at:at] = bytes(rng.randrange(256) for _ in range(n))
        return f"insert {n} bytes at {at}"
    del buf[at : at + n]
    return f"delete {n} bytes at {at}"


def header_field(rng: random.Random, buf: bytearray) -> str:
    field = rng.choice(sorted(HEADER_FIELDS))
    at, code = HEADER_FIELDS[field]
    if len(buf) < HEADER_SIZE:
        return splice(rng, buf)
    bits = struct.calcsize(code) * 8
    value = _value(rng, bits, struct.unpack_from("<" + code, buf, at)[0])
    struct.pack_into("<" + code, buf, at, value)
    return f"header {field} = {value}"


def index_field(rng: random.Random, buf: bytearray) -> str:
    entries = _entry_fields(bytes(buf))
    if not entries:
        return header_field(rng, buf)
    i = rng.randrange(len(entries))
    field = rng.choice(sorted(f for f in entries[i] if f != "name"))
    at, code = entries[i][field]
    bits = struct.calcsize(code) * 8
    others = [struct.unpack_from("<" + e[field][1], buf, e[field][0])[0] for e in entries if field in e]
    if field == "dtype":
        value = rng.choice((0, 1, 2, 3, 8, 9, 12, 14, 30, 31, 127, 128, 129, 130, 255))
    elif field == "ndim":
        value = rng.choice((0, 1, 8, 9, 16, 255))
    else:
        value = _value(rng, bits, struct.unpack_from("<" + code, buf, at)[0], others)
    struct.pack_into("<" + code, buf, at, value)
    return f"entry {i} {field} = {value}"


def rename(rng: random.Random, buf: bytearray) -> str:
    """Make a name equal to, or sort before, its neighbour's, or invalid UTF-8 (same length)."""
    entries = _entry_fields(bytes(buf))
    if len(entries) < 2:
        return flip_bytes(rng, buf)
    i = rng.randrange(1, len(entries))
    at, code = entries[i]["name"]
    n = struct.calcsize(code)
    prev_at, prev_code = entries[i - 1]["name"]
    prev = bytes(buf[prev_at : prev_at + struct.calcsize(prev_code)])
    how = rng.choice(("duplicate", "unsorted", "utf8"))
    if how == "duplicate" and len(prev) == n:
        buf[at : at + n] = prev
    elif how == "utf8":
        buf[at + rng.randrange(n)] = rng.choice((0x80, 0xC0, 0xFF, 0xED))
    else:
        buf[at] = 0
    return f"entry {i} name {how}"


METADATA_PAYLOADS = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "not json": b"\x00\xffnot json at all",
    "list": b"[1,2,3]",
    "nan": b'{"x":NaN}',
    "inf": b'{"x":1e999}',
    "bad utf8": b'{"x":"\xff\xfe"}',
    "huge int": b'{"x":' + b"9" * 5000 + b"}",
    "unterminated": b'{"x":[1,2',
    "null": b"null",
    "empty object": b"{}",
    "trailing": b'{"x":1} garbage',
}


def set_metadata(buf: bytearray, new: bytes) -> None:
    """Put `new` in place of the metadata and move index and data behind it (header offsets updated)."""
    (_, _, _, _, _, meta_off, _, index_off, data_off, _) = _HEADER.unpack_from(buf, 0)
    index, rest = bytes(buf[index_off:data_off]), bytes(buf[data_off:])
    new_index_off = meta_off + len(new) + (-len(new) % 64)
    buf[:] = bytes(buf[:meta_off]) + new + bytes(-len(new) % 64) + index + rest
    struct.pack_into("<I", buf, 20, len(new))
    struct.pack_into("<Q", buf, 24, new_index_off)
    struct.pack_into("<Q", buf, 32, new_index_off + len(index))


def metadata(rng: random.Random, buf: bytearray) -> str:
    """Replace the metadata with something hostile."""
    if len(buf) < HEADER_SIZE:
        return splice(rng, buf)
    kind = rng.choice(sorted(METADATA_PAYLOADS))
    set_metadata(buf, METADATA_PAYLOADS[kind])
    return f"metadata {kind}"


MUTATIONS: list[Callable[[random.Random, bytearray], str]] = [
    flip_bytes, truncate, splice, header_field, header_field, index_field, index_field, index_field, rename, metadata,
]
MUTATIONS_ORDER = [metadata, rename, index_field, header_field, flip_bytes, splice, truncate]


def make_case(seed: int, bases: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """The mutated file for `seed` and a description of what was done to which base."""
    rng = random.Random(seed)
    base_name, data = bases[rng.randrange(len(bases))]
    buf = bytearray(data)
    chosen = [rng.choice(MUTATIONS) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    # Mutations aimed at fields need an intact layout: run them before the blind ones.
    steps = [mutate(rng, buf) for mutate in sorted(chosen, key=MUTATIONS_ORDER.index)]
    # Fix the checksums (mostly) so the mutation reaches the deeper checks.
    if rng.random() < 0.8:
        _fix_header_crc(buf)
    if rng.random() < 0.8:
        _fix_footer_crc(buf)
    return f"{base_name}: {'; '.join(steps)}", bytes(buf)


# -- what every case must survive ---------------------------------------------------------
def read_everything(path: Path) -> None:
    """open_apr, every tensor's bytes, view and float32 values, and the footer CRC."""
    try:
        with open_apr(path) as f:
            for name in f.keys():
                f.info(name)
                bytes(f.raw(name))
                f[name]
                try:
                    f.to_float32(name)
                except AprError:
                    pass
            f.verify()
    except AprError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        raise


def open_and_read(path: Path) -> None:
    """The zero-copy path the memory check measures: open, each tensor's bytes and view, verify."""
    with open_apr(path) as f:
        for name in f.keys():
            f.raw(name)
            f[name]
        f.verify()


def run_case(seed: int, bases, folder: Path) -> str | None:
    """None when the case behaves, else a description of what went wrong."""
    what, data = make_case(seed, bases)
    path = folder / "case.apr"
    path.write_bytes(data)
    try:
        try:
            read_everything(path)
            opened = True
        except AprError:
            opened = False
        report = validate_file(path)
        assert isinstance(report, ValidationReport)
        failed = {c.name for c in report.checks if c.status == "FAIL"}
        if not opened:
            assert failed, "open_apr or reading failed but validate passed every check"
        else:  # what reads cleanly passes validate's structural checks (layout and NaN/Inf may still fail)
            assert not failed - {"layout", "nan/inf"}, f"read fine but validate failed {failed}"
        if seed % MEMORY_EVERY == 0 and opened and not what.startswith("fresh-zstd"):
            tracemalloc.start()
            try:
                open_and_read(path)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert peak < len(data) + 2**20, f"open+read peaked at {peak} bytes for a {len(data)}-byte file"
    except BaseException as exc:  # noqa: BLE001 - anything but AprError is the finding
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return f"seed {seed} ({what}): {type(exc).__name__}: {exc}"
    return None


def test_mutations_only_raise_apr_errors(bases, tmp_path):
    seeds = [int(ONLY_SEED)] if ONLY_SEED else range(CASES)
    failures = []
    for seed in seeds:
        problem = run_case(seed, bases, tmp_path)
        if problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} failing cases (rerun one with APR_FUZZ_SEED=<seed>):\n" + "\n".join(
        failures[:20]
    )


def test_mutations_reach_every_kind_of_error(bases, tmp_path):
    """The fuzzer is only worth something if its cases get past the header checks."""
    seen = set()
    for seed in range(300):
        _, data = make_case(seed, bases)
        path = tmp_path / "case.apr"
        path.write_bytes(data)
        try:
            read_everything(path)
        except AprError as exc:
            seen.add(type(exc).__name__)
    assert {"BadMagic", "HeaderChecksum", "CorruptMetadata", "CorruptIndex", "UnknownDType", "Truncated",
            "FooterChecksum", "UnsupportedVersion"} <= seen, seen


@pytest.mark.parametrize("kind", ["deep", "deep object", "nan", "inf", "list", "huge int", "bad utf8", "not json"])
def test_hostile_metadata_is_corrupt_metadata(kind, bases, tmp_path):
    buf = bytearray(dict(bases)["all-dtypes.apr"])
    set_metadata(buf, METADATA_PAYLOADS[kind])
    _fix_header_crc(buf)
    _fix_footer_crc(buf)
    path = tmp_path / "m.apr"
    path.write_bytes(bytes(buf))
    with pytest.raises(errors.CorruptMetadata):
        open_apr(path)
    assert [c.name for c in validate_file(path).checks if c.status == "FAIL"] == ["metadata"]


def test_zstd_frame_declaring_a_huge_size_is_refused_before_allocating(tmp_path):
    path = tmp_path / "z.apr"
    save_apr(path, {"t": np.zeros(1000, np.float32)}, compression="zstd")
    buf = bytearray(path.read_bytes())
    (fields,) = _entry_fields(bytes(buf))
    data_offset = struct.unpack_from("<Q", buf, 32)[0]
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(4000))
    # Same frame with an 8-byte content size field claiming 2**45 bytes (single segment).
    assert frame[4] & 0xC0 == 0 and not frame[4] & 0x20
    hostile = frame[:4] + bytes([0xE0 | (frame[4] & 0x07)]) + struct.pack("<Q", 2**45) + frame[6:]
    assert zstandard.get_frame_parameters(hostile).content_size == 2**45
    buf[data_offset:] = hostile + bytes(-len(hostile) % 64) + bytes(4)
    struct.pack_into("<Q", buf, fields["size"][0], len(hostile))
    _fix_footer_crc(buf)
    path.write_bytes(bytes(buf))
    tracemalloc.start()
    try:
        with open_apr(path) as f:
            with pytest.raises(errors.CorruptTensorData, match="declares 35184372088832 bytes, expected 4000"):
                f.raw("t")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20
    assert [c.name for c in validate_file(path).checks if c.status == "FAIL"] == ["zstd frames"]


def test_zstd_index_claiming_more_than_a_frame_can_hold_is_refused(tmp_path):
    path = tmp_path / "z.apr"
    save_apr(path, {"t": np.zeros(10, np.float32)}, compression="zstd")
    buf = bytearray(path.read_bytes())
    (fields,) = _entry_fields(bytes(buf))
    struct.pack_into("<Q", buf, fields["dim0"][0], 2**40)  # decoded size is computed from the shape
    _fix_footer_crc(buf)
    path.write_bytes(bytes(buf))
    with open_apr(path) as f:
        with pytest.raises(errors.CorruptTensorData, match="cannot inflate to 4398046511104 bytes"):
            f.raw("t")


@pytest.mark.parametrize("dim", [2**64 - 1, 2**63, 2**61])
def test_empty_tensor_with_absurd_dims_is_refused(dim, bases, tmp_path):
    # 0 x dim holds no bytes, so the size check passes; numpy still cannot describe the shape.
    buf = bytearray(dict(bases)["all-dtypes.apr"])
    empty = next(e for e in _entry_fields(bytes(buf)) if buf[e["name"][0] : e["name"][0] + 5] == b"empty")
    struct.pack_into("<Q", buf, empty["dim1"][0], dim)
    _fix_footer_crc(buf)
    path = tmp_path / "e.apr"
    path.write_bytes(bytes(buf))
    with pytest.raises(errors.CorruptIndex, match="'empty': shape .* is too large for any array"):
        open_apr(path)


@pytest.mark.parametrize("deviation,words", [
    ("padding", "padding after 'z.last/with-ünicode'"),
    ("reserved", "reserved header bytes"),
    ("trailing", "64 unexpected bytes between the last tensor and the footer"),
    ("hole", "'z.last/with-ünicode' starts at data offset 3456, expected 3392"),
])
def test_layout_deviations_fail_only_the_layout_check(deviation, words, bases, tmp_path):
    """Files our reader accepts but that break the spec's exact layout: validate says so."""
    buf = bytearray(dict(bases)["all-dtypes.apr"])
    data_offset = struct.unpack_from("<Q", buf, 32)[0]
    last = _entry_fields(bytes(buf))[-1]
    offset_at = last["offset"][0]
    start = data_offset + struct.unpack_from("<Q", buf, offset_at)[0]
    if deviation == "padding":
        buf[start + 8 + 5] = 1
    elif deviation == "reserved":
        buf[50] = 1
    elif deviation == "trailing":
        buf[-4:-4] = bytes(64)
    else:
        buf[start:start] = bytes(64)
        struct.pack_into("<Q", buf, offset_at, start + 64 - data_offset)
    _fix_header_crc(buf)
    _fix_footer_crc(buf)
    path = tmp_path / "l.apr"
    path.write_bytes(bytes(buf))
    read_everything(path)  # the reader takes it
    failed = [c for c in validate_file(path).checks if c.status == "FAIL"]
    assert [c.name for c in failed] == ["layout"] and words in failed[0].detail
