"""HF checkpoint (folder, shards or bare .safetensors) -> .apr, validated against the family table and streamed."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from apr_format import AprWriter
from apr_format.constants import DTYPE_BY_NAME, FLOAT_DTYPES
from apr_format.destination import check_output_file
from apr_format.errors import InvalidArgument, MissingTensor, ShapeMismatch
from apr_format.fileio import CHUNK_VALUES
from apr_format.families import Family, expected_tensors, family_of, is_tied, map_config
from apr_format.param_count import count_parameters

from .dtype_cast import cast_chunks
from .hf_source import INDEX_FILE, SINGLE_FILE, HfSource, SourceTensor, open_hf_source, read_config
from .metadata import HF_INDEX, SOURCE_METADATA, apr_metadata
from .quantize import QuantReport, check_kind, quantizes

TARGET_DTYPES = ("f32", "f16", "bf16")

# Called as progress(tensor name, its bytes, total bytes) as each tensor is written.
Progress = Callable[[str, int, int], None]


@dataclass
class ConversionReport:
    """What a conversion did, for rendering by the CLI."""

    source: str
    output: str
    architecture: str | None
    family: str | None  # the validated family, None when converted generically
    tensor_count: int
    param_count: int
    total_size: int  # bytes of tensor data in the output
    bytes_written: int  # size of the output file
    dtype: str | None  # the --dtype asked for, None when source dtypes were kept
    dtypes: dict[str, int] = field(default_factory=dict)  # output dtype -> tensor count
    lm_head_copy: bool = False
    extra_tensors: list[str] = field(default_factory=list)
    carried_files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    quantization: dict[str, Any] | None = None  # QuantReport.summary() when --quantize was given
    source_verified: bool | None = None  # .apr input: whether its footer CRC was checked (None: not an .apr)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class _Planned:
    name: str
    source: SourceTensor  # the tensor whose bytes are written (the embedding for a head copy)
    dtype: str

    @property
    def nbytes(self) -> int:
        return DTYPE_BY_NAME[self.dtype].nbytes_for(self.source.numel)


def convert_hf_to_apr(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    force: bool = False,
    lm_head_copy: bool = True,
    config_path: str | os.PathLike | None = None,
    compression: str | None = None,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> ConversionReport:
    """Convert an HF checkpoint to .apr, streaming one tensor at a time from the source mapping.

    `dtype` (f32/f16/bf16) casts float tensors; None keeps the stored bytes. A tied model gets
    aprender's `lm_head.weight` copy unless `lm_head_copy` is False. `config_path` supplies a
    config.json for a bare .safetensors file (or overrides the folder's). `quantize` (q8/q4)
    packs the tensors aprender quantizes (see `quantize.quantizes`); the rest keep `dtype`.

    Raises:
        OutputExists: `dst` exists and `force` is False.
        MissingTensor, ShapeMismatch: the checkpoint does not match its family's table.
        CorruptSource, Truncated, UnknownDType, InvalidArgument: bad input or arguments.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype is not None and dtype not in TARGET_DTYPES:
        raise InvalidArgument(dst, f"--dtype {dtype!r} is not one of {', '.join(TARGET_DTYPES)}")
    check_kind(quantize, dst)
    check_output_file(dst, force, src=src)
    with open_hf_source(src) as source:
        config, config_text = _config(source, config_path)
        family = family_of(config.get("model_type")) if config else None
        extra = _validate(source, config, family) if family else []
        plan = _plan(source, family, config, dtype, lm_head_copy, quantize)
        quant = QuantReport.for_plan(quantize, [(p.name, p.dtype) for p in plan])
        if dtype is not None and config is not None and any(p.dtype not in (p.source.dtype, quantize) for p in plan):
            config, config_text = with_dtype(config, dtype), None
        param_count = count_parameters(config or {}, {n: t.shape for n, t in source.tensors.items()}).distinct
        total_size = sum(p.nbytes for p in plan)
        meta, flags = apr_metadata(
            config, source=src, original_format="safetensors", extra_files=source.extra_files,
            param_count=param_count, total_size=total_size, config_text=config_text,
        )
        file_meta = _source_metadata(source)
        if file_meta:
            meta[SOURCE_METADATA] = file_meta
        if source.index is not None:
            meta[HF_INDEX] = {"metadata": source.index["metadata"], "weight_map": source.index["weight_map"]}
        if quant is not None:
            meta.update(quant.metadata())
        writer = AprWriter(dst, meta, compression=compression, flags=flags, overwrite=force)
        for p in plan:
            writer.add(p.name, _producer(source, p, progress, total_size, quant), dtype=p.dtype, shape=p.source.shape)
        writer.close()
    dtypes: dict[str, int] = {}
    for p in plan:
        dtypes[p.dtype] = dtypes.get(p.dtype, 0) + 1
    return ConversionReport(
        source=src, output=dst, architecture=config.get("model_type") if config else None,
        family=family.name if family else None, tensor_count=len(plan), param_count=param_count,
        total_size=total_size, bytes_written=os.path.getsize(dst), dtype=dtype, dtypes=dtypes,
        lm_head_copy=any(p.name != p.source.name for p in plan), extra_tensors=extra,
        carried_files=sorted(source.extra_files), warnings=_warnings(source, config, family),
        quantization=quant.summary() if quant else None,
    )


def _config(source: HfSource, config_path: str | os.PathLike | None) -> tuple[dict[str, Any] | None, str | None]:
    if config_path is not None:
        text, config = read_config(config_path)
        return config, text
    return source.config, source.config_text


def _validate(source: HfSource, config: Mapping[str, Any], family: Family) -> list[str]:
    """Check every tensor the family needs; return the unexpected extra tensors (kept)."""
    arch = {**family.defaults, **map_config(config, family), "hf_config": dict(config)}
    layers = arch.get("num_layers")
    if isinstance(layers, int) and layers > len(source.tensors):  # before listing billions of names
        raise MissingTensor(source.path, f"the config's {layers} layers need more tensors than the "
                            f"{len(source.tensors)} the checkpoint holds")
    expected = expected_tensors(family.name, arch, path=source.path)
    missing = [name for name in expected if name not in source.tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingTensor(
            source.path, f"tensor {missing[0]!r} is missing{more}: {family.name} with this config needs "
            f"{list(expected[missing[0]])}",
        )
    for name, shape in expected.items():
        found = source.tensors[name].shape
        if found != shape:
            raise ShapeMismatch(
                source.path, f"tensor {name!r} has shape {list(found)} but the {family.name} config needs {list(shape)}"
            )
    allowed = set(expected) | {family.head}
    return [name for name in source.tensors if name not in allowed]


def _plan(
    source: HfSource, family: Family | None, config: Mapping[str, Any] | None, dtype: str | None, lm_head_copy: bool,
    quantize: str | None = None,
) -> list[_Planned]:
    def target(name: str, t: SourceTensor) -> str:
        if t.dtype not in FLOAT_DTYPES:
            return t.dtype
        if quantize is not None and quantizes(name, t.numel):
            return quantize
        return dtype if dtype is not None else t.dtype

    plan = [_Planned(name, t, target(name, t)) for name, t in source.tensors.items()]
    if (family is not None and lm_head_copy and family.head not in source.tensors
            and is_tied(dict(config or {}), family)):
        embed = source.tensors[family.embed]
        plan.append(_Planned(family.head, embed, target(family.head, embed)))
    return plan


def _producer(
    source: HfSource, p: _Planned, progress: Progress | None, total: int, quant: QuantReport | None = None
) -> Callable[[], Any]:
    def produce():
        if quant is not None and p.dtype == quant.kind:
            step = CHUNK_VALUES * DTYPE_BY_NAME[p.source.dtype].itemsize
            values = cast_chunks(source.chunks(p.source.name, step), p.source.dtype, "f32", p.source.numel)
            data = quant.pack(p.name, values, source.path)
        elif p.dtype == p.source.dtype:  # the stored bytes as they are: copied file to file by the kernel
            data = source.file_range(p.source.name)
        else:
            step = CHUNK_VALUES * DTYPE_BY_NAME[p.source.dtype].itemsize
            data = cast_chunks(source.chunks(p.source.name, step), p.source.dtype, p.dtype, p.source.numel)
        if progress is not None:
            progress(p.name, p.nbytes, total)
        return data

    return produce


def with_dtype(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The config with its dtype entry (transformers 4: torch_dtype, 5: dtype) set to `dtype`."""
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
    return {**config, **{k: DTYPE_BY_NAME[dtype].torch for k in keys}}


def _source_metadata(source: HfSource) -> dict[str, str]:
    merged: dict[str, str] = {}
    for meta in source.file_metadata.values():
        merged.update(meta)
    return merged


def _warnings(source: HfSource, config: Mapping[str, Any] | None, family: Family | None) -> list[str]:
    out = []
    if config is None:
        out.append("no config.json: architecture metadata left empty (pass --config)")
    elif family is None:
        model_type = config.get("model_type")
        what = f"architecture {model_type!r} has no family table" if isinstance(model_type, str) \
            else "config.json has no model_type"
        out.append(f"{what}: converted without validation")
    chosen = INDEX_FILE if source.index is not None else SINGLE_FILE
    for name in source.ignored_files:
        out.append(f"{name} is not part of the model ({chosen} does not name it): not converted")
    index_total = (source.index or {}).get("total_size")
    if source.index is not None and index_total is None:
        out.append("the shard index has no metadata.total_size")
    elif index_total is not None and index_total != source.total_size:
        out.append(f"the shard index says total_size {index_total} but the shards hold {source.total_size} bytes")
    return out
