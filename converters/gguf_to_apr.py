"""Convert a llama / qwen2 GGUF file to .apr: HF names and layout, dequantized, one tensor at a time."""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from apr_format import AprWriter
from apr_format.architecture import ArchitectureConfig
from apr_format.constants import DTYPE_BY_NAME, DTYPES
from apr_format.destination import check_output_file
from apr_format.fileio import CHUNK_VALUES
from apr_format.errors import (
    CorruptMetadata, CorruptSource, InvalidArgument, MissingConfigKey, MissingTensor, ShapeMismatch,
    UnsupportedArchitecture, UnsupportedFeature, VocabMismatch, from_os_error,
)
from apr_format.families import (
    GGUF_ARCHITECTURES, GGUF_CONFIG_DEFAULTS, GGUF_CONFIG_KEYS, GGUF_REQUIRED_KEYS, GGUF_TOKEN_ID_KEYS,
    expected_tensors, get_family, gguf_to_hf_name, map_config, permute_heads_key,
)
from apr_format.sourceio import read_exact

from .dtype_cast import cast
from .gguf_tokenizer import tokenizer_files
from .hf_to_apr import ConversionReport, Progress
from .metadata import apr_metadata
from .quantize import QuantReport, check_kind, quantizes

OUT_DTYPES = ("bf16", "f16", "f32")
# GGML type -> APR dtype with identical block bytes (codes 12 / 14): kept unchanged by --keep-quant.
KEEP_RAW = {d.gguf: d.name for d in DTYPES.values() if d.quantized and d.gguf}
_MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS
_INTEGER_TYPES = frozenset(("I8", "I16", "I32", "I64"))
_PLAIN_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # GGML float types stored value by value
_GGUF_MAGIC = b"GGUF"
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class GgufReport(ConversionReport):
    """A ConversionReport plus what only a GGUF source has."""

    source_types: dict[str, int] = field(default_factory=dict)  # GGML type -> GGUF tensor count
    kept_quantized: int = 0  # tensors written raw as q4_k / q6_k (--keep-quant)
    # per GGML type: {"source_type", "count", "output", "reason"}: what became of its tensors and why
    dtype_choices: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # GGUF tensors dropped on purpose (rope_freqs)
    tokenizer: str | None = None  # tokenizer.ggml.model rebuilt as tokenizer.json, None if none


@dataclass
class _Entry:
    name: str
    tensor: Any  # gguf ReaderTensor
    shape: tuple[int, ...]
    dtype: str
    heads: int | None  # un-permute rows in this many head groups


def convert_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    keep_quant: bool = False,
    force: bool = False,
    lm_head_copy: bool = True,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> GgufReport:
    """Write `dst` (.apr) from the GGUF file `src`.

    Tensors get HF names and HF layout (llama.cpp's q/k row permutation undone for the llama
    family). With `dtype` None the output is lossless: F32 / F16 / BF16 tensors keep their
    dtype and quantized blocks are dequantized to f32 (as transformers' GGUF loader does);
    a `dtype` casts everything to it. With `keep_quant` Q4_K / Q6_K are copied raw as APR
    q4_k / q6_k. `dtype_choices` in the report says what became of each GGML type and why. A tied model gets `lm_head.weight` as a copy of the
    embedding unless `lm_head_copy` is False. The tokenizer is rebuilt as HF tokenizer.json.
    `quantize` (q8/q4) packs the tensors aprender quantizes from their float32 values instead.

    Raises:
        InvalidArgument, OutputExists, CorruptSource (not GGUF, truncated, inconsistent),
        UnsupportedArchitecture, UnsupportedFeature, MissingConfigKey, MissingTensor,
        ShapeMismatch, VocabMismatch.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise InvalidArgument(dst, f"--dtype {dtype!r} is not one of {', '.join(OUT_DTYPES)}")
    check_kind(quantize, dst)
    if quantize and keep_quant:
        raise InvalidArgument(src, "--keep-quant and --quantize contradict each other (choose one)")
    check_output_file(dst, force, src=src)
    reader = open_gguf(src)
    meta = read_metadata(reader, src)
    reader.fields.clear()  # gguf-py keeps numpy arrays per token string; `meta` has the values now
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        what = f"GGUF architecture {arch!r} is" if isinstance(arch, str) else "a GGUF without general.architecture is"
        raise UnsupportedArchitecture(src, f"{what} not supported (supported: {', '.join(GGUF_ARCHITECTURES)})")
    family = get_family(GGUF_ARCHITECTURES[arch], src)
    tensors, skipped = map_tensors(reader, src)
    config = hf_config(meta, arch, tensors, src)
    warnings = [f"{name} dropped: llama3-style rope scaling is not supported, plain RoPE is used"
                for name in skipped if name.startswith("rope_freqs")]
    tok = tokenizer_files(meta, src, model_max_length=config["max_position_embeddings"])
    warnings += tok.warnings
    if tok.files and tok.vocab_size > config["vocab_size"]:
        raise VocabMismatch(
            src, f"tokenizer has {tok.vocab_size} tokens, more than the model's {config['vocab_size']} rows"
        )
    tied = config["tie_word_embeddings"]
    entries = plan_tensors(tensors, config, family.name, family.gguf_qk_permuted, dtype, keep_quant, src, quantize)
    floats = sorted(entries, key=lambda e: e.name != _EMBED)  # the embedding's dtype names the model's
    config["torch_dtype"] = DTYPE_BY_NAME[next((e.dtype for e in floats if e.dtype in OUT_DTYPES), "f32")].torch
    choices = _dtype_choices(entries, dtype, keep_quant)  # before the head copy: one line per GGUF tensor
    param_count = sum(_numel(e.shape) for e in entries)
    if tied and lm_head_copy:
        embed = next(e for e in entries if e.name == _EMBED)
        entries.append(_Entry(_HEAD, embed.tensor, embed.shape, embed.dtype, None))
    total_size = sum(_nbytes(e) for e in entries)
    extra_files = {**tok.files, "generation_config.json": _generation_config(config)}
    metadata, flags = apr_metadata(
        config, source=src, original_format="gguf", extra_files=extra_files,
        param_count=param_count, total_size=total_size, name=_general_name(meta),
    )
    metadata.update(_gguf_keys(meta, reader))
    kept = [e for e in entries if e.dtype in KEEP_RAW.values()]
    if kept:
        metadata["quantization"] = _quantization(kept)
    quant = QuantReport.for_plan(quantize, [(e.name, e.dtype) for e in entries])
    if quant is not None:
        metadata.update(quant.metadata())
    with AprWriter(dst, metadata, flags=flags, overwrite=force) as writer:
        for entry in entries:
            writer.add(entry.name, _loader(entry, src, progress, total_size, quant), dtype=entry.dtype, shape=entry.shape)
    return GgufReport(
        source=src, output=dst, architecture=arch, family=family.name, tensor_count=len(entries),
        param_count=param_count, total_size=total_size, bytes_written=os.path.getsize(dst), dtype=dtype,
        dtypes=dict(sorted(Counter(e.dtype for e in entries).items())), lm_head_copy=tied and lm_head_copy,
        carried_files=sorted(extra_files), warnings=warnings,
        source_types=metadata["gguf_tensor_types"], kept_quantized=len(kept), skipped=skipped,
        tokenizer=tok.model if tok.files else None, quantization=quant.summary() if quant else None,
        dtype_choices=choices,
    )


def _general_name(meta: dict[str, Any]) -> str | None:
    name = meta.get("general.name")
    return name.strip() if isinstance(name, str) and name.strip() else None


def _dtype_choices(entries: list[_Entry], dtype: str | None, keep_quant: bool) -> list[dict[str, Any]]:
    """Per GGML type: how many tensors, what they became, and why (the report says it in one line each)."""
    groups = Counter((e.tensor.tensor_type.name, e.dtype) for e in entries)
    choices = []
    for (source, output), count in sorted(groups.items()):
        choices.append({"source_type": source, "count": count, "output": output,
                        "reason": _reason(source, output, dtype, keep_quant)})
    return choices


def _reason(source: str, output: str, dtype: str | None, keep_quant: bool) -> str:
    if output in KEEP_RAW.values():
        return "kept as quantized blocks (--keep-quant)"
    plain = source in _PLAIN_TYPES
    if dtype is not None:
        exact = plain and _PLAIN_TYPES[source] == dtype or (source == "F16" and dtype == "f32")
        verb = "kept" if plain and _PLAIN_TYPES[source] == dtype else "cast" if plain else "dequantized"
        return f"{verb} to {dtype} (--dtype {dtype}{'' if exact else ': values rounded'})"
    if plain:
        return "kept as it is (lossless default)"
    why = "APR keeps only Q4_K and Q6_K blocks; " if keep_quant else ""
    return f"{why}dequantized to f32, every value exact (lossless default; --dtype bf16 for a smaller file)"


# -- reading the GGUF --------------------------------------------------------------------------
def open_gguf(src: str) -> Any:
    """A gguf.GGUFReader over `src` (memory-mapped), every parse failure a CorruptSource.

    Raises:
        CorruptSource: not a GGUF file, or a header / tensor table that does not fit the file.
        UnsupportedFeature: the optional `gguf` package is not installed.
    """
    try:
        import gguf
    except ImportError:
        raise UnsupportedFeature(src, "GGUF input needs the 'gguf' package: pip install 'apr-toolkit[gguf]'") from None

    _check_layout(src)
    try:
        reader = gguf.GGUFReader(src, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, MemoryError) as exc:
        raise CorruptSource(src, f"unreadable GGUF (truncated or corrupt): {exc}") from None
    size = os.path.getsize(src)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CorruptSource(src, f"tensor {t.name!r} ends past the end of the file ({size} bytes)")
    return reader


def _check_layout(src: str) -> None:
    """Walk the GGUF header, key/values and tensor table with every length checked against the
    file size, so gguf-py (which slices its map without bounds checks) only sees sane files.

    Raises:
        CorruptSource: bad magic or version, or a length that runs past the end of the file.
    """
    try:
        fh = open(src, "rb")
    except OSError as exc:
        raise from_os_error(src, exc) from None
    with fh:
        magic = fh.read(4)
        if magic != _GGUF_MAGIC:
            raise CorruptSource(src, f"not a GGUF file: magic is {magic!r}, expected b'GGUF'")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _walk_header(_Cursor(buf, src, pos=4), src)


def _walk_header(cursor: "_Cursor", src: str) -> None:
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise CorruptSource(src, f"GGUF version {version} is not supported (2 or 3)")
    tensor_count, kv_count = cursor.unpack("<Q"), cursor.unpack("<Q")
    for _ in range(kv_count):
        cursor.string()
        cursor.value(cursor.unpack("<I"), depth=0)
    for _ in range(tensor_count):
        cursor.string()
        n_dims = cursor.unpack("<I")
        if n_dims > _MAX_GGUF_DIMS:
            raise CorruptSource(src, f"a tensor has {n_dims} dimensions (at most {_MAX_GGUF_DIMS})")
        cursor.skip(8 * n_dims + 4 + 8)


class _Cursor:
    """Bounds-checked reads of GGUF's little-endian fields."""

    _SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
    _STRING, _ARRAY = 8, 9

    def __init__(self, buf, src: str, pos: int) -> None:
        self.buf, self.src, self.pos = buf, src, pos

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise CorruptSource(
                self.src, f"GGUF header runs past the end of the file ({len(self.buf)} bytes) at byte {self.pos}"
            )
        self.pos += n

    def unpack(self, fmt: str) -> int:
        start = self.pos
        self.skip(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> None:
        self.skip(self.unpack("<Q"))

    def value(self, kind: int, depth: int) -> None:
        if kind in self._SCALARS:
            self.skip(self._SCALARS[kind])
        elif kind == self._STRING:
            self.string()
        elif kind == self._ARRAY and depth < 2:
            item, count = self.unpack("<I"), self.unpack("<Q")
            if item in self._SCALARS:
                self.skip(count * self._SCALARS[item])
            elif count > (len(self.buf) - self.pos) // 8:  # every string or array takes >= 8 bytes
                raise CorruptSource(self.src, f"GGUF array of {count} items cannot fit in the file at byte {self.pos}")
            else:
                for _ in range(count):
                    self.value(item, depth + 1)
        else:
            raise CorruptSource(self.src, f"GGUF value type {kind} at byte {self.pos} is unknown")


def read_metadata(reader: Any, src: str) -> dict[str, Any]:
    """GGUF key -> Python value; float32 scalars as the shortest decimal that round-trips.

    Raises:
        CorruptSource: a string that is not UTF-8, or a value gguf-py cannot decode.
    """
    from gguf import GGUFValueType

    out: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or not fld.types:
            continue
        try:
            value = fld.contents()
        except (ValueError, IndexError) as exc:  # UnicodeDecodeError is a ValueError
            raise CorruptSource(src, f"GGUF metadata {key!r} cannot be decoded: {exc}") from None
        if fld.types == [GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))  # 9.999999747378752e-06 -> 1e-05
        out[key] = value
    return out


def map_tensors(reader: Any, src: str) -> tuple[dict[str, Any], list[str]]:
    """HF name -> GGUF tensor, and the GGUF names skipped on purpose.

    Raises:
        UnsupportedArchitecture: a tensor no table knows; CorruptSource: two map to one name.
    """
    mapped: dict[str, Any] = {}
    skipped: list[str] = []
    for t in reader.tensors:
        name, known = gguf_to_hf_name(t.name)
        if not known:
            raise UnsupportedArchitecture(
                src, f"tensor {t.name!r} has no HF name in the GGUF table (unsupported model part)"
            )
        if name is None:
            skipped.append(t.name)
            continue
        if name in mapped:
            raise CorruptSource(src, f"tensors {mapped[name].name!r} and {t.name!r} both map to {name!r}")
        mapped[name] = t
    return mapped, skipped


def hf_config(meta: dict[str, Any], arch: str, tensors: dict[str, Any], src: str) -> dict[str, Any]:
    """A config.json-style dict from `{arch}.*` and `tokenizer.ggml.*` metadata.

    Raises:
        MissingConfigKey: a key llama.cpp itself requires is absent.
        UnsupportedFeature: partial rotary, rope scaling, per-layer head counts.
        MissingTensor: no token_embd.weight.
    """
    missing = [f"{arch}.{k}" for k in GGUF_REQUIRED_KEYS if meta.get(f"{arch}.{k}") is None]
    if missing:
        raise MissingConfigKey(src, f"GGUF metadata lacks {', '.join(missing)}")
    if _EMBED not in tensors:
        raise MissingTensor(src, "GGUF has no token_embd.weight (model.embed_tokens.weight)")
    family = get_family(GGUF_ARCHITECTURES[arch], src)
    config: dict[str, Any] = {"architectures": [family.hf_architecture], "model_type": family.name}
    for gguf_key, hf_key in GGUF_CONFIG_KEYS.items():
        value = meta.get(f"{arch}.{gguf_key}")
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedFeature(
                    src, f"{arch}.{gguf_key} varies per layer ({sorted(set(value))}); not supported"
                )
            value = value[0]
        if value is not None:
            config[hf_key] = value
    for hf_key, value in GGUF_CONFIG_DEFAULTS.items():
        config.setdefault(hf_key, value)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("vocab_size", int(tensors[_EMBED].shape[-1]))
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and rope_dims != head_dim:
        raise UnsupportedFeature(
            src, f"partial rotary ({arch}.rope.dimension_count {rope_dims}, head_dim {head_dim}) is not supported"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedFeature(
            src, f"rope scaling {scaling!r} ({arch}.rope.scaling.type) is not supported (only plain RoPE)"
        )
    config["hidden_act"] = "silu"
    config["tie_word_embeddings"] = _HEAD not in tensors
    if family.attention_bias_key:  # GGUF has no such key: the biases' presence says it
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in tensors
    for gguf_key, hf_key in GGUF_TOKEN_ID_KEYS.items():
        value = meta.get(f"tokenizer.ggml.{gguf_key}")
        if isinstance(value, int):
            config[hf_key] = value
    _check_config(config, arch, len(tensors), src)
    return config


def _check_config(config: dict[str, Any], arch: str, tensor_count: int, src: str) -> None:
    """The numbers must describe a model the trainer can build, and one this file can hold."""
    try:
        ArchitectureConfig.from_metadata({"architecture": config["model_type"], "hf_config": config}, src)
    except CorruptMetadata as exc:  # the values came from the GGUF, not from APR metadata
        raise CorruptSource(src, f"GGUF metadata: {exc.problem}") from None
    if config["num_hidden_layers"] > tensor_count:
        raise CorruptSource(
            src, f"{arch}.block_count is {config['num_hidden_layers']} but the file holds only {tensor_count} tensors"
        )


def _generation_config(config: dict[str, Any]) -> str:
    """generation_config.json text with the special ids, as transformers derives it from config.json."""
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    return json.dumps({"_from_model_config": True, **ids}, indent=2) + "\n"


def _gguf_keys(meta: dict[str, Any], reader: Any) -> dict[str, Any]:
    """Custom APR keys saying where the weights came from (spec: "Metadata", custom keys)."""
    out: dict[str, Any] = {}
    if isinstance(meta.get("general.license"), str):
        out["license"] = meta["general.license"]
    general = {k: v for k, v in meta.items() if k.startswith("general.") and isinstance(v, (str, int, float))}
    out["gguf_general"] = general
    out["gguf_tensor_types"] = dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))
    return out


def _quantization(kept: list[_Entry]) -> dict[str, Any]:
    kinds = sorted({e.dtype for e in kept})
    return {"quant_type": "+".join(kinds), "bits": 6 if kinds == ["q6_k"] else 4, "block_size": 256, "symmetric": False}


# -- planning and loading ----------------------------------------------------------------------
def plan_tensors(
    tensors: dict[str, Any], config: dict, family: str, permuted: bool, dtype: str | None, keep_quant: bool, src: str,
    quantize: str | None = None,
) -> list[_Entry]:
    """One entry per HF tensor with its output dtype; names and shapes checked against the family.

    Raises:
        MissingTensor, ShapeMismatch, UnsupportedArchitecture (extra tensors), UnsupportedFeature.
    """
    arch = {**map_config(config), "hf_config": config}
    expected = expected_tensors(family, arch, path=src)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise MissingTensor(src, f"GGUF lacks {len(missing)} tensor(s) the {family} model needs, e.g. {missing[0]!r}")
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise UnsupportedArchitecture(
            src, f"tensor {tensors[extra[0]].name!r} ({extra[0]}) is not part of a {family} model"
        )
    entries = []
    for name, t in tensors.items():
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
        if shape != expected[name]:
            raise ShapeMismatch(
                src, f"tensor {t.name!r} ({name}) has shape {list(shape)}, expected {list(expected[name])}"
            )
        _check_type(t, src)
        out = _output_dtype(t.tensor_type.name, dtype, keep_quant)
        if quantize is not None and quantizes(name, _numel(shape)):
            out = quantize
        heads_key = permute_heads_key(name) if permuted else None
        entries.append(_Entry(name, t, shape, out, config[heads_key] if heads_key else None))
    return entries


def _output_dtype(ggml_type: str, dtype: str | None, keep_quant: bool) -> str:
    """Kept raw (--keep-quant), cast (--dtype), or lossless: plain floats as they are, blocks to f32."""
    if keep_quant and ggml_type in KEEP_RAW:
        return KEEP_RAW[ggml_type]
    if dtype is not None:
        return dtype
    return _PLAIN_TYPES.get(ggml_type, "f32")


def _check_type(t: Any, src: str) -> None:
    import gguf

    if t.tensor_type.name in _INTEGER_TYPES:
        raise UnsupportedFeature(src, f"tensor {t.name!r}: integer GGML type {t.tensor_type.name} in a weight")
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), t.tensor_type)
    except (NotImplementedError, KeyError, ValueError):
        raise UnsupportedFeature(
            src, f"tensor {t.name!r}: GGML type {t.tensor_type.name} cannot be dequantized"
        ) from None


def _loader(
    entry: _Entry, src: str, progress: Progress | None, total: int, quant: QuantReport | None = None
) -> Callable[[], np.ndarray | bytes]:
    """Zero-argument producer of one output tensor (called once, while the writer streams)."""

    def load() -> np.ndarray | bytes:
        if quant is not None and entry.dtype == quant.kind:
            result = quant.pack(entry.name, convert_tensor(replace(entry, dtype="f32"), src), src)
        else:
            result = convert_tensor(entry, src)
        if progress is not None:
            progress(entry.name, _nbytes(entry), total)
        return result

    return load


def convert_tensor(entry: _Entry, src: str) -> np.ndarray:
    """The output bytes of one tensor, dequantized a block of rows at a time (bounded memory).

    Every GGML type quantizes rows independently, so llama.cpp's q/k row permutation is undone
    on the stored rows before dequantizing (and on the raw blocks when they are kept).
    """
    import gguf

    t = entry.tensor
    stored = _stored(t, src)  # typed values for F32/F16, uint8 [rows, bytes per row] otherwise
    if entry.heads:
        stored = unpermute(stored, entry.heads)
    if entry.dtype in KEEP_RAW.values():
        return np.ascontiguousarray(stored)
    rows = stored.reshape(entry.shape[0] if len(entry.shape) > 1 else 1, -1)
    out = np.empty(entry.shape, dtype=DTYPE_BY_NAME[entry.dtype].numpy)  # bf16 as its bit pattern
    out_rows = out.reshape(rows.shape[0], -1)
    step = max(1, CHUNK_VALUES // max(1, out_rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        values = gguf.quants.dequantize(rows[start : start + step], t.tensor_type)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if entry.dtype != "f32":
            values = cast(memoryview(values).cast("B"), "f32", entry.dtype)
        out_rows[start : start + step] = values.reshape(-1, out_rows.shape[1])
    return out


def _stored(t: Any, src: str) -> np.ndarray:
    """The tensor's stored values as gguf-py describes them, read with pread rather than through its
    memory map: a file cut short meanwhile is then a `Truncated` error, not SIGBUS."""
    fd = os.open(src, os.O_RDONLY)
    try:
        raw = read_exact(fd, int(t.data_offset), int(t.n_bytes), src)
    finally:
        os.close(fd)
    return np.frombuffer(raw, dtype=t.data.dtype).reshape(t.data.shape)


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: GGML adjacent-pair rope rows back to HF halves."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _nbytes(entry: _Entry) -> int:
    return DTYPE_BY_NAME[entry.dtype].nbytes_for(_numel(entry.shape))
