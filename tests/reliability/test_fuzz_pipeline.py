"""Hostile files through the whole pipeline: structural mutations (hypothesis) and byte-level damage of
.apr, safetensors and HF folders, fed to the reader, inspect, tensors, validate, convert, export, diff and
load_init_tensors. Only AprError subclasses may come out (naming the file; the CLI prints them as one
escaped line), no allocation grows past the file's size, nothing hangs, and a refused conversion leaves
no file behind.

APR_FUZZ_CASES sets the examples per strategy (default 500; `make fuzz` runs 100000). Hypothesis runs
derandomized, so every run draws the same cases; the byte-level passes are seeded by case number.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import signal
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from apr_cli.inspect_cmd import summarize_apr, summarize_hf
from apr_cli.tensors_cmd import list_apr, list_hf
from apr_converters.apr_to_hf import export_apr_to_hf
from apr_converters.diff import diff_checkpoints
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_format import AprError, AprWriter, Flag, load_init_tensors, open_apr, save_apr
from apr_format.architecture import ArchitectureConfig
from apr_format.header import header_checksum
from apr_format.validate import validate_file

from apr_testing import GOLDEN, TINY_CONFIG, env_cases, leftovers, qwen2_tensors, record, run_apr
from format import test_fuzz as byte_fuzz  # the reader fuzzer's seeded mutations, reused


pytestmark = pytest.mark.filterwarnings("ignore::apr_format.init_tensors.UnusedTensorWarning")
CASES = env_cases("APR_FUZZ_CASES", 500)
MEMORY_EVERY = 7  # tracemalloc on every 7th case: it slows reading down several times
MEMORY_SLACK = 2 << 20  # fixed overhead on top of the file size: the writer's 1 MiB buffer, JSON, tables
HANG_SECONDS = 20  # a case takes milliseconds; one still running after this is stuck (a finding, not slowness)
# No shrinking: a hanging case would be re-run for minutes; the unshrunk example is printed and reproducible.
SETTINGS = settings(max_examples=CASES, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate))

U64_EDGES = (0, 1, 7, 63, 64, 65, 255, 256, 2**16, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63,
             2**64 - 64, 2**64 - 1)
HOSTILE_JSON = byte_fuzz.METADATA_PAYLOADS  # not JSON, deep nesting, NaN, huge numbers, wrong types
# JSON values for configuration keys: absurd sizes, wrong types, deep nesting.
hostile_values = st.one_of(
    st.sampled_from([0, -1, 1, 3, 10**9, 2**31, 2**63, 2**64 + 1, 10**30, 1e308, -0.0, 0.5, "", "64", "silu",
                     "qwen2", "llama", "bert", True, False, None, [], {}, [8], {"rope_type": "yarn"}]),
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.recursive(st.integers(0, 9), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                                                 inner, max_size=3)),
)
ARCH_KEYS = ("architecture", "model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
             "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rms_norm_eps",
             "tie_word_embeddings", "tied_embeddings", "attention_bias", "hf_config", "rope_scaling", "hidden_act")
HF_CONFIG_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta",
                  "rope_parameters", "torch_dtype", "dtype", "architectures", "hidden_act")


class Hang(Exception):
    """A case ran past HANG_SECONDS."""


def _alarm(signum, frame):
    raise Hang(f"no result after {HANG_SECONDS} s")


def guarded(what: str, call: Callable[[], object]) -> str:
    """Run one pipeline step: 'ok', or the AprError's class name; anything else fails the case."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        call()
        return "ok"
    except AprError as exc:  # names from the file may be in the message: the CLI escapes it (tested below)
        assert exc.path is not None, f"{what}: {exc!r} names no file"
        return type(exc).__name__
    except Exception as exc:  # anything but an AprError is the finding
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from exc
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def peak_allocation(call: Callable[[], object]) -> int:
    """Bytes allocated at the peak of `call()` (Python and numpy; AprErrors are expected and ignored)."""
    tracemalloc.start()
    try:
        try:
            call()
        except AprError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- what every hostile .apr goes through ------------------------------------------------------
def read_all(path: Path) -> None:
    """Open, then every tensor's view and float32 values (k-quants may say they cannot dequantize)."""
    with open_apr(path) as f:
        for name in f.keys():
            f[name]
            try:
                f.to_float32(name)
            except AprError as exc:
                if "dequantizing" not in str(exc):
                    raise


def verify(path: Path) -> None:
    with open_apr(path) as f:
        f.verify()


# Checks of validate that a file the reader accepts may still fail (spec layout, NaN/Inf, the CRC).
NOT_STRUCTURAL = {"layout", "nan/inf", "footer checksum"}


def apr_pipeline(path: Path, work: Path, reference: Path) -> dict[str, str]:
    """Every consumer of an .apr run on `path`: outcome per step, checked for consistency."""
    out = {
        "read": guarded("read", lambda: read_all(path)),
        "verify": guarded("verify", lambda: verify(path)),
        "inspect": guarded("inspect", lambda: summarize_apr(str(path))),
        "tensors": guarded("tensors", lambda: list_apr(str(path))),
        "load_init_tensors": guarded("load_init_tensors", lambda: load_init_tensors(path)),
        "diff": guarded("diff", lambda: diff_checkpoints(path, reference)),
    }
    report = validate_file(path)  # never raises for a broken file: it reports
    failed = {c.name for c in report.checks if c.status == "FAIL"}
    assert (out["read"] == "ok") == (not failed - NOT_STRUCTURAL), (out, failed)
    if out["read"] == "ok":
        assert (out["verify"] == "ok") == ("footer checksum" not in failed), (out, failed)
    if out["load_init_tensors"] == "ok":
        assert out["read"] == out["verify"] == "ok", out
    hf = work / "hf"
    out["export"] = guarded("export", lambda: export_apr_to_hf(path, hf, force=True))
    assert (out["export"] == "ok") == hf.is_dir() and leftovers(work) == [], (out, leftovers(work))
    if hf.exists():
        shutil.rmtree(hf)
    return out


def check_apr_memory(path: Path) -> None:
    """Opening, listing, reading every tensor and validating never allocates more than the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
    if len(head) == 8 and struct.unpack_from("<H", head, 6)[0] & Flag.ZSTD:
        return  # zstd tensors inflate beyond the file size by design (the zstd test below bounds them)
    for name, call in (("read", lambda: read_all(path)), ("inspect", lambda: summarize_apr(str(path))),
                       ("validate", lambda: validate_file(path)), ("load", lambda: load_init_tensors(path))):
        peak = peak_allocation(call)
        assert peak < size + MEMORY_SLACK, f"{name} peaked at {peak} bytes for a {size}-byte file"


# -- structural .apr strategy ------------------------------------------------------------------
@dataclass
class Entry:
    name: bytes
    code: int
    dims: list[int]
    data: bytes
    name_len: int | None = None  # declared length when it lies
    offset: int | None = None  # index value when it lies
    size: int | None = None


@dataclass
class AprModel:
    entries: list[Entry]
    metadata: bytes
    header: dict[str, int] = field(default_factory=dict)  # field -> value written instead of the true one
    fix_header_crc: bool = True
    fix_footer_crc: bool = True
    truncate_to: float | None = None  # fraction of the file kept
    raw: list[tuple[float, bytes]] = field(default_factory=list)  # (position as a fraction, bytes written)


def _tiny_arch_metadata() -> dict:
    config = {**TINY_CONFIG, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1}
    arch = ArchitectureConfig.from_metadata({"hf_config": config})
    return {**arch.to_metadata(), "tied_embeddings": True}


def base_apr_model() -> AprModel:
    tensors = qwen2_tensors()
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # aprender's tied copy
    entries = [Entry(n.encode(), 0, list(t.shape), t.tobytes()) for n, t in sorted(tensors.items())]
    return AprModel(entries, json.dumps(_tiny_arch_metadata()).encode())


HEADER_FIELDS = {"version_major": (4, "B"), "version_minor": (5, "B"), "flags": (6, "H"), "tensor_count": (8, "I"),
                 "metadata_offset": (12, "Q"), "metadata_size": (20, "I"), "tensor_index_offset": (24, "Q"),
                 "data_offset": (32, "Q")}


def serialize(model: AprModel) -> bytes:
    """The bytes of `model`, laid out as a writer would, with its lies written where they belong."""
    pad = lambda b: b + bytes(-len(b) % 64)
    offsets, cursor = [], 0
    for e in model.entries:
        offsets.append(cursor)
        cursor += len(pad(e.data))
    index = b""
    for e, offset in zip(model.entries, offsets):
        name_len = e.name_len if e.name_len is not None else len(e.name)
        index += struct.pack("<H", name_len % 2**16) + e.name + bytes((e.code, len(e.dims) % 256))
        index += b"".join(struct.pack("<Q", d % 2**64) for d in e.dims)
        index += struct.pack("<QQ", (e.offset if e.offset is not None else offset) % 2**64,
                             (e.size if e.size is not None else len(e.data)) % 2**64)
    meta = model.metadata
    index_offset = 64 + len(pad(meta))
    true = {"version_major": 2, "version_minor": 0, "flags": int(Flag.LAYOUT_ROW_MAJOR),
            "tensor_count": len(model.entries), "metadata_offset": 64, "metadata_size": len(meta),
            "tensor_index_offset": index_offset, "data_offset": index_offset + len(pad(index))}
    buf = bytearray(64)
    buf[:4] = b"APR\x00"
    for name, (at, code) in HEADER_FIELDS.items():
        value = model.header.get(name, true[name])
        struct.pack_into("<" + code, buf, at, value % 2 ** (8 * struct.calcsize(code)))
    if model.fix_header_crc:
        struct.pack_into("<I", buf, 40, header_checksum(bytes(buf)))
    buf += pad(meta) + pad(index) + b"".join(pad(e.data) for e in model.entries)
    for where, data in model.raw:
        at = int(where * len(buf))
        buf[at : at + len(data)] = data
    buf += struct.pack("<I", zlib.crc32(bytes(buf)) if model.fix_footer_crc else 0)
    if model.truncate_to is not None:
        del buf[int(model.truncate_to * len(buf)):]
    return bytes(buf)


index = st.integers(0, 10**6)  # picks an entry modulo the count
names = st.one_of(
    st.binary(max_size=40), st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\x1b[31mred\x07", "evil\u202emoc.exe".encode(), b"a" * 256, b"a" * 257, b"b" * 4000,
                     b"model.embed_tokens.weight", b"lm_head.weight", b"model.layers.7.self_attn.q_proj.bias",
                     b"model.layers.0.self_attn.q_proj.bias\xff"]),
)
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
apr_mutation = st.one_of(
    st.tuples(st.just("drop"), index),
    st.tuples(st.just("duplicate name"), index),
    st.tuples(st.just("swap"), index, index),
    st.tuples(st.just("transpose"), index),
    st.tuples(st.just("resize"), index, st.lists(st.integers(0, 9), max_size=3)),
    st.tuples(st.just("dim"), index, index, u64),
    st.tuples(st.just("extra dims"), index, st.integers(1, 250), u64),
    st.tuples(st.just("dtype"), index, st.one_of(st.sampled_from([0, 1, 3, 4, 5, 6, 7, 8, 9, 12, 14, 30, 128, 129]),
                                                 st.integers(0, 255))),
    st.tuples(st.just("offset"), index, st.one_of(u64, index.map(lambda i: -1 - i))),  # negative: another's offset
    st.tuples(st.just("size"), index, u64),
    st.tuples(st.just("name"), index, names),
    st.tuples(st.just("name length"), index, st.one_of(st.sampled_from([0, 1, 256, 257, 2**16 - 1]),
                                                       st.integers(0, 2**16 - 1))),
    st.tuples(st.just("short data"), index, st.integers(0, 200)),
    st.tuples(st.just("metadata key"), st.sampled_from(ARCH_KEYS), hostile_values),
    st.tuples(st.just("metadata raw"), st.one_of(st.sampled_from(sorted(HOSTILE_JSON)), st.binary(max_size=64))),
    st.tuples(st.just("header"), st.sampled_from(sorted(HEADER_FIELDS)), u64),
    st.tuples(st.just("flags"), st.integers(0, 2**16 - 1)),
    st.tuples(st.just("raw bytes"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("crc"), st.booleans(), st.booleans()),
)


def mutate_apr(model: AprModel, op: tuple) -> None:
    kind, *args = copy.deepcopy(op)  # hypothesis may hand the same object to two ops: never nest it in itself
    es = model.entries
    pick = (lambda i: es[i % len(es)]) if es else None
    if kind == "drop" and es:
        del es[args[0] % len(es)]
    elif kind == "duplicate name" and len(es) > 1:
        i = args[0] % (len(es) - 1) + 1
        es[i].name = es[i - 1].name
    elif kind == "swap" and es:
        i, j = args[0] % len(es), args[1] % len(es)
        es[i], es[j] = es[j], es[i]
    elif kind == "transpose" and es:
        pick(args[0]).dims.reverse()
    elif kind == "resize" and es:  # a consistent tensor of another shape
        e = pick(args[0])
        e.dims = list(args[1])
        e.data = bytes(4 * int(np.prod(e.dims)))
    elif kind == "dim" and es and pick(args[0]).dims:
        e = pick(args[0])
        e.dims[args[1] % len(e.dims)] = args[2]
    elif kind == "extra dims" and es:
        pick(args[0]).dims += [args[2]] * args[1]
    elif kind == "dtype" and es:
        pick(args[0]).code = args[1]
    elif kind == "offset" and es:
        value = args[1]
        pick(args[0]).offset = value if value >= 0 else 64 * ((-1 - value) % len(es))
    elif kind == "size" and es:
        pick(args[0]).size = args[1]
    elif kind == "name" and es:
        pick(args[0]).name = args[1]
    elif kind == "name length" and es:
        pick(args[0]).name_len = args[1]
    elif kind == "short data" and es:
        e = pick(args[0])
        e.data = e.data[: min(args[1], len(e.data))]
    elif kind == "metadata key":
        try:
            meta = json.loads(model.metadata)
        except (ValueError, RecursionError):
            meta = {}
        if isinstance(meta, dict):
            meta[args[0]] = args[1]
            model.metadata = json.dumps(meta).encode()
    elif kind == "metadata raw":
        model.metadata = HOSTILE_JSON.get(args[0], args[0])
    elif kind == "header":
        model.header[args[0]] = args[1]
    elif kind == "flags":
        model.header["flags"] = args[0]
    elif kind == "raw bytes":
        model.raw.append((args[0], args[1]))
    elif kind == "truncate":
        model.truncate_to = args[0]
    elif kind == "crc":
        model.fix_header_crc, model.fix_footer_crc = args


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A valid tiny .apr for diff to compare hostile files with."""
    path = tmp_path_factory.mktemp("ref") / "ref.apr"
    base = base_apr_model()
    path.write_bytes(serialize(base))
    assert validate_file(path).ok
    return path


def tally(counts: dict[str, int], key: str) -> int:
    counts[key] = counts.get(key, 0) + 1
    return counts[key]


def test_base_model_passes_the_whole_pipeline(reference, tmp_path):
    """The unmutated structure is a valid checkpoint every step accepts (so mutations start from valid)."""
    outcomes = apr_pipeline(reference, tmp_path, reference)
    assert set(outcomes.values()) == {"ok"}, outcomes
    assert len(load_init_tensors(reference)) == 14


def test_structural_apr_mutations(reference, tmp_path_factory):
    """Hypothesis-built hostile .apr files; afterwards, the outcomes show the cases got past the header:
    files are refused for many reasons, and some load fully."""
    counts: dict[str, int] = {}

    @SETTINGS
    @given(ops=st.lists(apr_mutation, min_size=1, max_size=4))
    @example(ops=[("metadata key", "num_layers", 10**9)])
    @example(ops=[("metadata key", "num_heads", 0)])
    @example(ops=[("metadata key", "hf_config", {"model_type": "qwen2", "num_hidden_layers": 10**12})])
    @example(ops=[("extra dims", 0, 9, 1)])
    @example(ops=[("name length", 3, 2**16 - 1)])
    @example(ops=[("offset", 2, -2)])
    @example(ops=[("metadata raw", "deep")])
    @example(ops=[("transpose", 1)])
    @example(ops=[("crc", False, True)])
    def case(ops):
        model = base_apr_model()
        for op in ops:
            mutate_apr(model, op)
        work = tmp_path_factory.mktemp("apr", numbered=True)
        path = work / "hostile.apr"
        path.write_bytes(serialize(model))
        for step, outcome in apr_pipeline(path, work, reference).items():
            tally(counts, f"{step} {outcome}")
        if tally(counts, "cases") % MEMORY_EVERY == 0:
            check_apr_memory(path)
        shutil.rmtree(work)

    case()
    record("fuzz: structural .apr", **counts)
    refused = {key.split()[-1] for key in counts if key.startswith("read ")}
    assert {"CorruptIndex", "CorruptMetadata", "Truncated", "UnknownDType", "HeaderChecksum"} <= refused, counts
    loaded = {key.split()[-1] for key in counts if key.startswith("load_init_tensors ")}
    assert "ok" in loaded and {"MissingTensor", "ShapeMismatch", "CorruptMetadata"} <= loaded, counts


# -- byte-level damage of valid files (the reader fuzzer's mutations) through the pipeline ------
@pytest.fixture(scope="module")
def byte_bases(tmp_path_factory) -> list[tuple[str, bytes]]:
    folder = tmp_path_factory.mktemp("bases")
    extra = folder / "tiny-zstd.apr"
    with open_apr(GOLDEN / "tiny-qwen2.apr") as f, AprWriter(extra, f.metadata, compression="zstd") as w:
        for info in f.tensors():
            w.add(info.name, f[info.name].copy(), dtype=info.dtype)
    files = [GOLDEN / "all-dtypes.apr", GOLDEN / "tiny-qwen2.apr", GOLDEN / "tiny-llama.apr", extra]
    return [(p.name, p.read_bytes()) for p in files]


def test_byte_damage_through_the_pipeline(byte_bases, reference, tmp_path):
    failures, outcomes = [], {}
    for seed in range(CASES):
        what, data = byte_fuzz.make_case(seed, byte_bases)
        work = tmp_path / str(seed)
        work.mkdir()
        path = work / "case.apr"
        path.write_bytes(data)
        try:
            outcome = apr_pipeline(path, work, reference)["read"]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if seed % MEMORY_EVERY == 0:
                check_apr_memory(path)
        except AssertionError as exc:
            failures.append(f"seed {seed} ({what}): {exc}")
    record("fuzz: byte damage .apr", cases=CASES, **outcomes)
    assert not failures, "\n".join(failures[:10])


# -- hostile safetensors and HF folders through inspect, tensors and convert -------------------
@dataclass
class StModel:
    """A safetensors checkpoint as data: header entries (JSON-able, possibly absurd) and layout choices."""

    header: dict  # name -> entry; "__metadata__" included
    data: bytes
    config: dict | bytes | None  # config.json: a dict, raw bytes, or absent
    layout: str = "folder"  # folder | bare | sharded
    duplicate: str | None = None  # a key written twice in the JSON text
    header_len: int | None = None  # the u64 prefix when it lies
    header_text: bytes | None = None  # replaces the JSON text
    truncate_to: float | None = None
    index_overrides: dict = field(default_factory=dict)  # tensor name -> weight_map value (sharded)
    index_raw: bytes | None = None


def base_st_model() -> StModel:
    tensors = qwen2_tensors()
    header, chunks, cursor = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in sorted(tensors.items()):
        raw = t.tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [cursor, cursor + len(raw)]}
        chunks.append(raw)
        cursor += len(raw)
    return StModel(header, b"".join(chunks), dict(TINY_CONFIG))


def st_bytes(model: StModel, header: dict) -> bytes:
    text = model.header_text
    if text is None:
        text = json.dumps(header).encode()
        if model.duplicate is not None and model.duplicate in header:
            extra = json.dumps({model.duplicate: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})[1:-1]
            text = b"{" + extra.encode() + b"," + text[1:]
    text += b" " * (-len(text) % 8)
    length = model.header_len if model.header_len is not None else len(text)
    out = struct.pack("<Q", length % 2**64) + text + model.data
    if model.truncate_to is not None:
        out = out[: int(model.truncate_to * len(out))]
    return out


def write_st_model(model: StModel, work: Path) -> Path:
    """Lay `model` out on disk; returns what to hand to convert (a folder or a bare file)."""
    folder = work / "src"
    folder.mkdir()
    if isinstance(model.config, dict):
        (folder / "config.json").write_text(json.dumps(model.config))
    elif isinstance(model.config, bytes):
        (folder / "config.json").write_bytes(model.config)
    if model.layout == "bare":
        path = folder / "weights.safetensors"
        path.write_bytes(st_bytes(model, model.header))
        return path
    if model.layout == "folder":
        (folder / "model.safetensors").write_bytes(st_bytes(model, model.header))
        return folder
    names = sorted(k for k in model.header if k != "__metadata__")
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        header = {k: v for k, v in model.header.items() if k in part or k == "__metadata__"}
        (folder / shard).write_bytes(st_bytes(model, header))  # each shard keeps the whole data section
        weight_map.update({k: shard for k in part})
    weight_map.update(model.index_overrides)
    index = model.index_raw or json.dumps({"metadata": {"total_size": len(model.data)}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_bytes(index if isinstance(index, bytes) else index.encode())
    return folder


SHARED_VALUE = {"rope_type": "yarn"}
st_mutation = st.one_of(
    st.tuples(st.just("transpose"), index),
    st.tuples(st.just("dtype"), index, st.one_of(
        st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "U64", "I16", "f32", "", "Q4"]),
        hostile_values)),
    st.tuples(st.just("shape"), index, st.one_of(st.lists(st.one_of(st.sampled_from(U64_EDGES), st.integers(
        -(2**65), 2**65), st.booleans(), st.floats(allow_nan=False, allow_infinity=False)), max_size=10),
        hostile_values)),
    st.tuples(st.just("offsets"), index, st.one_of(st.lists(st.one_of(st.sampled_from(U64_EDGES), st.integers(
        -(2**65), 2**65), st.floats(allow_nan=False, allow_infinity=False)), max_size=3), hostile_values,
        st.just("overlap"), st.just("reverse"))),
    st.tuples(st.just("entry"), index, hostile_values),
    st.tuples(st.just("drop"), index),
    st.tuples(st.just("rename"), index, st.one_of(st.text(max_size=30), st.sampled_from(
        ["", "__metadata__", "\x1b]0;pwned\x07", "a" * 5000, "model.layers.9.mlp.up_proj.weight"]))),
    st.tuples(st.just("duplicate"), index),
    st.tuples(st.just("metadata"), hostile_values),
    st.tuples(st.just("header length"), u64),
    st.tuples(st.just("header text"), st.one_of(st.sampled_from(sorted(HOSTILE_JSON)), st.binary(max_size=64))),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("layout"), st.sampled_from(["folder", "bare", "sharded"])),
    st.tuples(st.just("config key"), st.sampled_from(HF_CONFIG_KEYS), hostile_values),
    st.tuples(st.just("config raw"), st.one_of(st.sampled_from(sorted(HOSTILE_JSON)), st.none())),
    st.tuples(st.just("index entry"), index, st.one_of(st.sampled_from(
        ["../escape.safetensors", "/etc/passwd", "", ".", "..", "missing.safetensors", "model-00001-of-00002.safetensors",
         "sub/model.safetensors"]), hostile_values)),
    st.tuples(st.just("index raw"), st.sampled_from(sorted(HOSTILE_JSON))),
)


def mutate_st(model: StModel, op: tuple) -> None:
    kind, *args = copy.deepcopy(op)  # hypothesis may hand the same object to two ops: never nest it in itself
    names = [k for k in model.header if k != "__metadata__"]
    pick = (lambda i: names[i % len(names)]) if names else None
    if kind == "transpose" and names:
        entry = model.header[pick(args[0])]
        if isinstance(entry, dict) and isinstance(entry.get("shape"), list):
            entry["shape"] = entry["shape"][::-1]
    elif kind in ("dtype", "shape") and names:
        entry = model.header[pick(args[0])]
        if isinstance(entry, dict):
            entry[kind] = args[1]
    elif kind == "offsets" and names:
        entry, value = model.header[pick(args[0])], args[1]
        if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list):
            offsets = entry["data_offsets"]
            if value == "overlap":
                other = model.header[pick(args[0] + 1)]
                if isinstance(other, dict) and isinstance(other.get("data_offsets"), list) and other["data_offsets"]:
                    entry["data_offsets"] = [other["data_offsets"][0], other["data_offsets"][0] + (
                        offsets[1] - offsets[0] if len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                        else 4)]
            elif value == "reverse":
                entry["data_offsets"] = offsets[::-1]
            else:
                entry["data_offsets"] = value
    elif kind == "entry" and names:
        model.header[pick(args[0])] = args[1]
    elif kind == "drop" and names:
        del model.header[pick(args[0])]
    elif kind == "rename" and names:
        old = pick(args[0])
        model.header[args[1]] = model.header.pop(old)
    elif kind == "duplicate" and names:
        model.duplicate = pick(args[0])
    elif kind == "metadata":
        model.header["__metadata__"] = args[0]
    elif kind == "header length":
        model.header_len = args[0]
    elif kind == "header text":
        model.header_text = HOSTILE_JSON.get(args[0], args[0])
    elif kind == "truncate":
        model.truncate_to = args[0]
    elif kind == "layout":
        model.layout = args[0]
    elif kind == "config key" and isinstance(model.config, dict):
        model.config[args[0]] = args[1]
    elif kind == "config raw":
        model.config = HOSTILE_JSON.get(args[0]) if args[0] is not None else None
    elif kind == "index entry" and names:
        model.index_overrides[pick(args[0])] = args[1]
    elif kind == "index raw":
        model.index_raw = HOSTILE_JSON[args[0]]


def hf_pipeline(src: Path, work: Path) -> dict[str, str]:
    """inspect, tensors and convert on a hostile HF source; a refused convert leaves nothing."""
    dst = work / "out.apr"
    out = {
        "inspect": guarded("inspect", lambda: summarize_hf(str(src))),
        "tensors": guarded("tensors", lambda: list_hf(str(src))),
        "convert": guarded("convert", lambda: convert_hf_to_apr(src, dst)),
    }
    if out["convert"] == "ok":
        report = validate_file(dst)
        assert not {c.name for c in report.checks if c.status == "FAIL"} - {"nan/inf"}, report.to_dict()
        assert guarded("read converted", lambda: read_all(dst)) == "ok"
    else:
        assert not dst.exists()
    assert leftovers(work) == [], leftovers(work)
    return out


def test_base_safetensors_model_converts(tmp_path):
    src = write_st_model(base_st_model(), tmp_path)
    assert set(hf_pipeline(src, tmp_path).values()) == {"ok"}


def test_structural_safetensors_mutations(tmp_path_factory):
    """Hypothesis-built hostile safetensors files, HF folders, configs and shard indexes; afterwards, the
    outcomes show every kind of refusal was reached, and some conversions succeeded."""
    counts: dict[str, int] = {}

    @SETTINGS
    @given(ops=st.lists(st_mutation, min_size=1, max_size=4))
    @example(ops=[("config key", "num_hidden_layers", 10**9)])
    @example(ops=[("config key", "num_attention_heads", 0)])
    @example(ops=[("config key", "hidden_size", -8)])
    @example(ops=[("offsets", 1, "overlap")])
    @example(ops=[("duplicate", 2)])
    @example(ops=[("header length", 2**64 - 1)])
    @example(ops=[("layout", "sharded"), ("index entry", 0, "../escape.safetensors")])
    @example(ops=[("header text", "deep object")])
    @example(ops=[("config raw", "deep")])
    @example(ops=[("transpose", 1)])
    @example(ops=[("entry", 0, SHARED_VALUE), ("dtype", 0, SHARED_VALUE)])  # one object in two ops (found at 100k)
    def case(ops):
        model = base_st_model()
        for op in ops:
            mutate_st(model, op)
        work = tmp_path_factory.mktemp("st", numbered=True)
        src = write_st_model(model, work)
        for step, outcome in hf_pipeline(src, work).items():
            tally(counts, f"{step} {outcome}")
        if tally(counts, "cases") % MEMORY_EVERY == 0:
            size = sum(p.stat().st_size for p in (work / "src").iterdir())
            for what, call in (("inspect", lambda: summarize_hf(str(src))),
                               ("convert", lambda: convert_hf_to_apr(src, work / "mem.apr", force=True))):
                peak = peak_allocation(call)
                assert peak < size + MEMORY_SLACK, f"{what} peaked at {peak} bytes for {size} bytes of input"
        shutil.rmtree(work)

    case()
    record("fuzz: structural safetensors / HF folder", **counts)
    refused = {key.split()[-1] for key in counts if key.startswith("convert ")}
    assert {"CorruptSource", "Truncated", "UnknownDType", "MissingTensor", "ShapeMismatch", "ok"} <= refused, counts


def test_byte_damage_of_safetensors_through_convert(tmp_path):
    """Seeded byte flips, truncations and u64 overwrites of a valid safetensors file."""
    base = base_st_model()
    original = st_bytes(base, base.header)
    header_end = 8 + struct.unpack_from("<Q", original)[0]
    failures, outcomes = [], {}
    for seed in range(CASES):
        rng = random.Random(seed)
        data = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            how = rng.choice(("flip", "u64", "truncate", "splice"))
            if how == "flip" and data:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(min(header_end, len(data)))] = rng.randrange(256)
            elif how == "u64" and len(data) >= 8:
                at = rng.choice((0, rng.randrange(max(1, min(header_end, len(data)) - 8))))
                data[at : at + 8] = rng.choice(U64_EDGES).to_bytes(8, "little")
            elif how == "truncate":
                del data[rng.randrange(len(data) + 1):]
            else:
                at = rng.randrange(len(data) + 1)
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        work = tmp_path / str(seed)
        work.mkdir()
        src = write_st_model(base, work)
        (src / "model.safetensors").write_bytes(bytes(data))
        try:
            result = hf_pipeline(src, work)
            outcomes[result["convert"]] = outcomes.get(result["convert"], 0) + 1
        except AssertionError as exc:
            failures.append(f"seed {seed}: {exc}")
    record("fuzz: byte damage safetensors", cases=CASES, **outcomes)
    assert not failures, "\n".join(failures[:10])
    assert outcomes.get("ok", 0) > 0 and sum(outcomes.values()) - outcomes.get("ok", 0) > CASES // 2, outcomes


# -- a sample through the installed CLI: exit codes, one line, no traceback --------------------
CLI_CASES = min(200, max(6, CASES // 50))


def test_hostile_files_through_the_cli(byte_bases, tmp_path):
    """inspect / tensors / validate on damaged .apr files and convert on damaged safetensors, as users run them."""
    base = base_st_model()
    problems = []
    for seed in range(CLI_CASES):
        what, data = byte_fuzz.make_case(1000 + seed, byte_bases)
        path = tmp_path / f"case{seed}.apr"
        path.write_bytes(data)
        for command, ok_codes in (("inspect", (0, 2)), ("tensors", (0, 2)), ("validate", (0, 1))):
            proc = run_apr(command, path, "--json")
            problems += _cli_problems(proc, ok_codes, f"{command} seed {seed} ({what})")
        rng = random.Random(seed)
        data = bytearray(st_bytes(base, base.header))
        data[rng.randrange(8, 400)] = rng.randrange(256)
        if seed % 2:
            data[: 8] = rng.choice(U64_EDGES).to_bytes(8, "little")
        work = tmp_path / f"st{seed}"
        work.mkdir()
        src = write_st_model(base, work)
        (src / "model.safetensors").write_bytes(bytes(data))
        proc = run_apr("convert", src, "-o", work / "out.apr", "--quiet")
        problems += _cli_problems(proc, (0, 2), f"convert seed {seed}")
        if proc.returncode:
            assert not (work / "out.apr").exists()
        assert leftovers(work) == []
    record("fuzz: CLI sample", files=2 * CLI_CASES, runs=4 * CLI_CASES, problems=len(problems))
    assert not problems, "\n".join(problems)


def _cli_problems(proc, ok_codes, what: str) -> list[str]:
    if proc.returncode not in ok_codes:
        return [f"{what}: exit {proc.returncode}: {proc.stderr[-500:]}"]
    if "Traceback" in proc.stderr:
        return [f"{what}: traceback: {proc.stderr[-500:]}"]
    if proc.returncode == 2:
        lines = proc.stderr.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("apr: error: ") or not lines[0].isprintable():
            return [f"{what}: not one printable error line: {proc.stderr!r}"]
        if proc.stdout:
            return [f"{what}: output on stdout with an error: {proc.stdout[:200]!r}"]
    return []


# -- decompression bombs (zstd extension) -------------------------------------------------------
def test_zstd_frame_claiming_a_gigabyte_is_refused_before_allocating_it(tmp_path):
    """A frame whose header pledges 1 GiB but whose body is noise: refused without allocating the GiB."""
    import zstandard

    claimed = 1 << 30
    start = zstandard.ZstdCompressor(write_content_size=True).compressobj(size=claimed).compress(bytes(1 << 20))
    frame_start = start[: zstandard.frame_header_size(start)]
    assert zstandard.get_frame_parameters(frame_start).content_size == claimed
    noise = random.Random(0).randbytes(40_000)  # enough bytes to pass the 32768x ratio check
    hostile = frame_start + noise
    path = tmp_path / "bomb.apr"
    save_apr(path, {"t": np.zeros(16, np.float32)}, compression="zstd")
    buf = bytearray(path.read_bytes())
    (fields,) = byte_fuzz._entry_fields(bytes(buf))
    data_offset = struct.unpack_from("<Q", buf, 32)[0]
    struct.pack_into("<Q", buf, fields["dim0"][0], claimed // 4)
    struct.pack_into("<Q", buf, fields["size"][0], len(hostile))
    buf[data_offset:] = hostile + bytes(-len(hostile) % 64) + bytes(4)
    byte_fuzz._fix_footer_crc(buf)
    path.write_bytes(bytes(buf))
    size = path.stat().st_size
    for what, call in (("read", lambda: read_all(path)), ("validate", lambda: validate_file(path))):
        peak = peak_allocation(call)
        assert peak < size + MEMORY_SLACK, f"{what} peaked at {peak} bytes for a {size}-byte file"
    assert [c.name for c in validate_file(path).checks if c.status == "FAIL"] == ["zstd frames"]


def test_highly_compressible_tensors_still_read_back(tmp_path):
    """The bomb check must not refuse honest constant tensors, which compress thousands of times."""
    path = tmp_path / "zeros.apr"
    values = np.zeros((1024, 1024), np.float32)
    values[7, 7] = 1.5
    save_apr(path, {"z": values}, compression="zstd")
    assert path.stat().st_size < 64 * 1024
    with open_apr(path) as f:
        assert np.array_equal(f["z"], values)
    assert validate_file(path).ok
