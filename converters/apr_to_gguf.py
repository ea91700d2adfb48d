""".apr llama / qwen2 model -> one GGUF file for llama.cpp: its tensor names, q/k row order, keys and tokenizer, streamed and atomic."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from apr_format import AprFile, open_apr
from apr_format.atomic import replacing
from apr_format.destination import check_output_file
from apr_format.errors import InvalidArgument, MissingTensor, ShapeMismatch, UnsupportedArchitecture, UnsupportedFeature
from apr_format.families import (
    CONFIG_KEYS, FAMILIES, FLOAT_KEYS, GGUF_CONFIG_KEYS, Family, dimensions, expected_tensors, family_of,
    hf_to_gguf_name, permute_heads_key,
)
from apr_format.quants import q4_to_ggml_q4_0

from .apr_to_hf import Progress, tied_head_copy
from .dtype_cast import cast, to_float
from .source_files import AprStream
from .metadata import HF_CONFIG, HF_FILES
from .tokenizer_to_gguf import GgufVocab, gguf_vocab

OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
_OUT_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}  # --outtype -> GGML type of 2-D tensors
_AUTO_TYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16"}  # --outtype auto: the tensor's own float type
_RAW_GGML = {"q4_k": "Q4_K", "q6_k": "Q6_K"}  # APR codes 12 / 14 hold GGML blocks: copied raw under auto
_APR_BLOCKS = ("q4", "q8")  # aprender's own blocks: dequantized, except q4 rows of whole blocks under auto
_Q4_0 = "Q4_0"  # APR q4 is GGML Q4_0 with its nibbles in another order: moved, not rounded
# general.file_type (gguf LlamaFileType) of the type most 2-D tensors get.
_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K": 15, "Q6_K": 18, "BF16": 32}


def _written_as(family: Family) -> Family:
    """The family a model of `family` is written to GGUF as (llama.cpp writes Mistral as llama)."""
    return FAMILIES[family.gguf_export_as] if family.gguf_export_as else family


_GGUF_ARCH = {f.name: _written_as(f).gguf_architecture for f in FAMILIES.values() if _written_as(f).gguf_architecture}


@dataclass
class GgufExportReport:
    """What a GGUF export wrote, for rendering by the CLI."""

    source: str
    output: str
    architecture: str
    outtype: str
    tensor_count: int = 0
    bytes_written: int = 0
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    dropped: list[str] = field(default_factory=list)  # aprender's lm_head copy of a tied model
    dequantized: list[str] = field(default_factory=list)  # quantized .apr tensors written as floats
    tokenizer_pre: str | None = None  # tokenizer.ggml.pre, None when no tokenizer was carried
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class _Planned:
    gguf: str
    source: str  # APR tensor name
    shape: tuple[int, ...]
    ggml: str  # GGMLQuantizationType name
    heads: int | None  # permute rows in this many head groups (llama.cpp's LlamaModel.permute)


def export_apr_to_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    outtype: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> GgufExportReport:
    """Write `dst` (.gguf) from the llama / qwen2 model `src` (.apr) as llama.cpp's converter would.

    `outtype` auto keeps each tensor's float type (f32 / f16 / bf16; q4_k / q6_k blocks raw), so
    nothing is rounded (APR q4 matrices become GGML Q4_0 blocks holding the same values);
    f32 / f16 / bf16 / q8_0 convert 2-D tensors. 1-D tensors (norms, biases) are F32 in every
    case, as llama.cpp writes them. Other APR q4 / q8 tensors are dequantized (listed in the
    report). A tied model's lm_head copy is left out (llama.cpp ties by its absence).

    Raises:
        InvalidArgument, OutputExists, UnsupportedArchitecture, MissingTensor, ShapeMismatch,
        UnsupportedFeature (integer tensors, a tokenizer that is not byte-level BPE).
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if outtype not in OUTTYPES:
        raise InvalidArgument(dst, f"--outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    check_output_file(dst, force, src=src, example="model.gguf")
    try:
        import gguf
    except ImportError:
        raise UnsupportedFeature(dst, "GGUF export needs the 'gguf' package: pip install 'apr-toolkit[gguf]'") from None

    with open_apr(src, use_mmap=False) as apr:
        meta = apr.metadata
        family = _family(meta, src)
        written, arch = _written_as(family), _GGUF_ARCH[family.name]
        report = GgufExportReport(source=src, output=dst, architecture=arch, outtype=outtype)
        if written is not family:
            report.warnings.append(_written_as_note(family, written, meta))
        stream = AprStream(apr)
        try:
            report.dropped = [name for name in [tied_head_copy(apr, stream)] if name]
            plan = _plan(apr, family, report, outtype, written.gguf_qk_permuted)
            keys = _architecture_keys(meta, family, arch, src, report.warnings)
            vocab = _vocab(meta, src)
            if vocab is None:
                report.warnings.append("no tokenizer.json in the .apr: the GGUF has no tokenizer (llama.cpp needs one)")
            else:
                report.tokenizer_pre = vocab.values["pre"]
                report.warnings += vocab.warnings
            report.types = dict(sorted(Counter(p.ggml for p in plan).items()))
            with replacing(dst, overwrite=force) as out:
                writer = _writer(gguf, out, arch)
                _add_keys(writer, gguf, keys, vocab, plan, meta)
                total = sum(_nbytes(gguf, p) for p in plan)
                for p in plan:
                    writer.add_tensor_info(p.gguf, *_info(gguf, p))
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for p in plan:
                    writer.write_tensor_data(_tensor(gguf, apr, stream, p))
                    if progress is not None:
                        progress(p.gguf, _nbytes(gguf, p), total)
                out.flush()
        finally:
            stream.close()
    report.tensor_count = len(plan)
    report.bytes_written = os.path.getsize(dst)
    return report


# -- planning ----------------------------------------------------------------------------------
def _family(meta: Mapping[str, Any], src: str) -> Family:
    model_type = meta.get("hf_model_type") or meta.get("architecture")
    family = family_of(model_type)
    if family is None or family.name not in _GGUF_ARCH:
        raise UnsupportedArchitecture(
            src, f"architecture {model_type!r} cannot be exported to GGUF (supported: {', '.join(sorted(_GGUF_ARCH))})"
        )
    return family


def _written_as_note(family: Family, written: Family, meta: Mapping[str, Any]) -> str:
    """What changes when a model is written as another family's GGUF (the report says it)."""
    note = (f"{family.name} is written as GGUF architecture {written.gguf_architecture!r}, as llama.cpp does; "
            f"reading it back gives a {written.name} model")
    window = meta.get("sliding_window")
    if window is not None:
        note += f"; its sliding_window {window} has no GGUF key, so llama.cpp attends to the whole context"
    return note


def _plan(apr: AprFile, family: Family, report: GgufExportReport, outtype: str, permute_qk: bool) -> list[_Planned]:
    """One entry per tensor written, names and shapes checked against the family table; q/k rows are
    permuted into llama.cpp's order when `permute_qk`."""
    meta, src = apr.metadata, apr.path
    names = [info.name for info in apr.tensors() if info.name not in report.dropped]
    expected = expected_tensors(family.name, meta, with_head_copy=family.head in names, path=src)
    missing = [name for name in expected if name not in apr]
    if missing:
        raise MissingTensor(src, f"tensor {missing[0]!r} is missing: a {family.name} model needs it")
    heads = {"num_attention_heads": meta["num_heads"], "num_key_value_heads": meta.get("num_kv_heads") or meta["num_heads"]}
    plan = []
    for name in names:
        info = apr.info(name)
        target = hf_to_gguf_name(name)
        if target is None:
            raise UnsupportedArchitecture(src, f"tensor {name!r} has no GGUF name (not part of a {family.name} model)")
        if name in expected and info.shape != expected[name]:
            raise ShapeMismatch(src, f"tensor {name!r} has shape {list(info.shape)}, the metadata needs {list(expected[name])}")
        key = permute_heads_key(name) if permute_qk else None
        ggml = _ggml_type(info.dtype, info.shape, outtype, src, name)
        if (info.dtype in _APR_BLOCKS and ggml != _Q4_0) or (info.dtype in _RAW_GGML and ggml != _RAW_GGML[info.dtype]):
            report.dequantized.append(name)
        if ggml == "F16" and outtype == "q8_0" and len(info.shape) > 1:
            report.warnings.append(f"{name}: rows of {info.shape[-1]} values are not whole Q8_0 blocks of 32; written F16")
        plan.append(_Planned(target, name, info.shape, ggml, heads[key] if key else None))
    return plan


def _ggml_type(dtype: str, shape: tuple[int, ...], outtype: str, src: str, name: str) -> str:
    if dtype not in (*_AUTO_TYPE, "f64", *_APR_BLOCKS, *_RAW_GGML):
        raise UnsupportedFeature(src, f"tensor {name!r} is {dtype}: a model weight must be a float or quantized type")
    if outtype == "auto" and dtype in _RAW_GGML:
        return _RAW_GGML[dtype]
    if outtype == "auto" and dtype == "q4" and len(shape) > 1 and shape[-1] % 32 == 0:
        return _Q4_0
    if len(shape) <= 1:
        return "F32"  # llama.cpp keeps norms and biases in F32 whatever the file type
    if outtype == "auto":
        return _AUTO_TYPE.get(dtype, "F32")  # q4 / q8 / f64 values are exact (or nearest) in F32
    if outtype == "q8_0" and shape[-1] % 32:
        return "F16"  # what llama.cpp's converter falls back to
    return _OUT_TYPE[outtype]


def _architecture_keys(
    meta: Mapping[str, Any], family: Family, arch: str, src: str, warnings: list[str]
) -> dict[str, int | float]:
    """`{arch}.*` keys from APR metadata: the GGUF import's key table read backwards."""
    dims = dimensions(meta, src)
    values = {**{k: v for k, v in family.defaults.items() if meta.get(k) is None}, **meta}
    for key in family.defaults:
        if meta.get(key) is None:
            warnings.append(f"metadata lacks {key}: wrote the {family.name} default {family.defaults[key]}")
    values.setdefault("num_kv_heads", meta["num_heads"])
    keys: dict[str, int | float] = {}
    for suffix, hf_key in GGUF_CONFIG_KEYS.items():
        apr_key = CONFIG_KEYS[hf_key]
        value = values.get(apr_key)
        if value is not None:
            keys[f"{arch}.{suffix}"] = float(value) if apr_key in FLOAT_KEYS else int(value)
    head_dim = int(meta.get("head_dim") or dims["hidden_size"] // meta["num_heads"])
    keys[f"{arch}.rope.dimension_count"] = head_dim  # llama.cpp's converter: head_dim, full rotary
    return keys


def _vocab(meta: Mapping[str, Any], src: str) -> GgufVocab | None:
    files = meta.get(HF_FILES)
    if not isinstance(files, Mapping) or not isinstance(files.get("tokenizer.json"), str):
        return None
    config = dict(meta[HF_CONFIG]) if isinstance(meta.get(HF_CONFIG), Mapping) else {}
    for key in ("bos_token_id", "eos_token_id"):  # aprender's tokenizer.* keys when there is no config.json
        if config.get(key) is None and meta.get(f"tokenizer.{key}") is not None:
            config[key] = meta[f"tokenizer.{key}"]
    template = meta.get("chat_template") if isinstance(meta.get("chat_template"), str) else None
    return gguf_vocab(files, config, int(meta["vocab_size"]), template, src)


# -- writing -----------------------------------------------------------------------------------
def _writer(gguf: Any, out: Any, arch: str) -> Any:
    """A GGUFWriter writing into `out` (our atomic temp) instead of opening a path itself."""
    from gguf.gguf_writer import WriterState

    class _IntoOpenFile(gguf.GGUFWriter):
        def open_output_file(self, path: Any = None) -> None:
            if self.state is WriterState.NO_FILE:
                self.fout, self.state = [out], WriterState.EMPTY

    return _IntoOpenFile(None, arch)


def _add_keys(writer: Any, gguf: Any, keys: dict, vocab: GgufVocab | None, plan: list[_Planned], meta: Mapping) -> None:
    """general.*, the architecture keys and tokenizer.ggml.*, each with llama.cpp's value type."""
    two_d = Counter(p.ggml for p in plan if len(p.shape) > 1)
    general: dict[str, Any] = {
        "general.name": meta.get("name") if isinstance(meta.get("name"), str) else None,
        "general.license": meta.get("license") if isinstance(meta.get("license"), str) else None,
        "general.file_type": _FILE_TYPE.get(two_d.most_common(1)[0][0], 0) if two_d else 0,
        "general.quantization_version": gguf.GGML_QUANT_VERSION,
    }
    tokenizer = {} if vocab is None else {"tokenizer.ggml.model": vocab.model,
                                          **{f"tokenizer.ggml.{k}": v for k, v in vocab.values.items()}}
    if "tokenizer.ggml.chat_template" in tokenizer:  # llama.cpp's key has no "ggml."
        tokenizer["tokenizer.chat_template"] = tokenizer.pop("tokenizer.ggml.chat_template")
    for key, value in {**general, **keys, **tokenizer}.items():
        if value is not None:
            _add_value(writer, gguf, key, value)


def _add_value(writer: Any, gguf: Any, key: str, value: Any) -> None:
    kinds = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_key_value(key, value, kinds.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, kinds.UINT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, kinds.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, kinds.STRING)
    else:  # token strings / merges / token types: a typed array even when empty
        sub = kinds.STRING if value and isinstance(value[0], str) else kinds.INT32
        writer.add_key_value(key, list(value), kinds.ARRAY, sub_type=sub)


def _info(gguf: Any, p: _Planned) -> tuple[tuple[int, ...], np.dtype, int, Any]:
    """add_tensor_info arguments: (shape, numpy dtype, bytes, GGML type). With a GGML type given and
    a numpy dtype other than uint8, gguf-py takes the shape as the logical one (the dtype is unused)."""
    return p.shape, np.dtype(np.float32), _nbytes(gguf, p), gguf.GGMLQuantizationType[p.ggml]


def _nbytes(gguf: Any, p: _Planned) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[p.ggml]]
    return int(np.prod(p.shape, dtype=np.int64)) // block * size


def _tensor(gguf: Any, apr: AprFile, stream: AprStream, p: _Planned) -> np.ndarray:
    """The bytes of one GGUF tensor, rows in llama.cpp's q/k order."""
    info = apr.info(p.source)
    rows = p.shape[0] if p.shape else 1
    if p.ggml == _RAW_GGML.get(info.dtype):
        data = np.frombuffer(stream.stream(p.source), dtype=np.uint8).reshape(rows, -1)
        return _permuted(data, p.heads)
    if p.ggml == _Q4_0:  # rows are whole blocks (checked in the plan), so they permute as rows
        return np.ascontiguousarray(_permuted(q4_to_ggml_q4_0(stream.stream(p.source), info.numel).reshape(rows, -1), p.heads))
    if info.dtype in _APR_BLOCKS:
        values, kind = apr.to_float32(p.source), "f32"
    elif info.dtype in _RAW_GGML:
        raw = np.frombuffer(stream.stream(p.source), dtype=np.uint8).reshape(rows, -1)
        values, kind = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[_RAW_GGML[info.dtype]]), "f32"
    else:
        values, kind = np.frombuffer(stream.stream(p.source), dtype=np.uint8), info.dtype
    data = _converted(gguf, memoryview(np.ascontiguousarray(values)).cast("B"), kind, p.ggml)
    return np.ascontiguousarray(_permuted(data.reshape(rows, -1), p.heads))


def _converted(gguf: Any, raw: memoryview, kind: str, ggml: str) -> np.ndarray:
    if ggml == "Q8_0":  # blocks of 32 along each row: whole rows, since rows are whole blocks
        return gguf.quants.quantize(to_float(raw, kind).reshape(-1, 32), gguf.GGMLQuantizationType.Q8_0)
    if ggml == "F32":
        return to_float(raw, kind)
    return cast(raw, kind, {"F16": "f16", "BF16": "bf16"}[ggml])


def _permuted(rows: np.ndarray, n_head: int | None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF rotate-half rows -> GGML adjacent pairs (whole rows, so
    quantized rows move as they are)."""
    if not n_head:
        return rows
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
