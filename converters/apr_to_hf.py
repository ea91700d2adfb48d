""".apr -> HF folder (config, shards, index, tokenizer files) or one safetensors file, streamed and atomic."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO

from apr_format import AprFile, open_apr
from apr_format.atomic import replacing, replacing_folder
from apr_format.constants import DTYPE_BY_NAME, QUANTIZED_DTYPES
from apr_format.destination import check_output_file, check_output_folder
from apr_format.errors import InvalidArgument, UnsupportedFeature
from apr_format.families import FAMILIES, family_of, is_tied
from apr_format.fileio import FileRange, equal_chunks
from apr_format.integrity import StreamingVerifier
from apr_format.safetensors_writer import OutTensor, apr_nbytes, file_size, layout, write_safetensors

from .hf_source import INDEX_FILE, SINGLE_FILE
from .source_files import AprStream
from .metadata import HF_FILES, HF_INDEX, SOURCE_METADATA, hf_config_text

DEFAULT_MAX_SHARD_SIZE = "5GB"
NO_VERIFY_HINT = "--no-verify reads it anyway"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

Progress = Callable[[str, int, int], None]  # (tensor name, its bytes, total bytes)


@dataclass
class ExportReport:
    """What an export wrote, for rendering by the CLI."""

    source: str
    output: str
    files: list[str] = field(default_factory=list)
    tensor_count: int = 0
    total_size: int = 0
    dropped: list[str] = field(default_factory=list)  # e.g. aprender's lm_head copy of a tied model
    config_written: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return asdict(self)


def parse_size(text: str | int, where: str | None = None) -> int:
    """Bytes in a size such as "2GB", "500MB", "64KiB" or a plain integer (HF's units: GB = 10^9).

    Raises:
        InvalidArgument: unparsable or not positive.
    """
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InvalidArgument(where, f"size {text!r} is not a number with a unit like 2GB, 500MB or 64KiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgument(where, f"size {text!r} must be positive")
    return value


def export_apr_to_hf(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_size: str | int | None = None,
    force: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
) -> ExportReport:
    """Write an HF folder that `from_pretrained` loads: config.json, weights (sharded above
    `max_shard_size`, with model.safetensors.index.json), carried tokenizer/generation files.

    With `max_shard_size` None the source checkpoint's own shard split is restored when the
    .apr carries it (and still matches the tensors), otherwise shards are cut at 5GB.
    The folder is built beside `out_dir` and renamed into place when complete, after the source's
    footer CRC-32 (computed while its bytes stream, unless `verify` is False) matched.

    Returns:
        An ExportReport: files written, tensor count, bytes, names left out.

    Raises:
        FooterChecksum: the source's bytes do not match its checksum (nothing is written).
        OutputExists: `out_dir` exists, is not empty, and `force` is False.
        UnsupportedFeature: quantized tensors (safetensors has no q4/q8/q4_k/q6_k).
        InvalidArgument: a tied model whose lm_head differs from its embedding; bad sizes.
    """
    src, out_dir = os.fspath(src), os.fspath(out_dir).rstrip(os.sep) or os.sep
    limit = parse_size(max_shard_size if max_shard_size is not None else DEFAULT_MAX_SHARD_SIZE, out_dir)
    check_output_folder(out_dir, force)
    report = ExportReport(source=src, output=out_dir)
    with open_apr(src, use_mmap=False) as apr, _closing(AprStream(apr, _verifier(apr, verify))) as stream:
        tensors, report.dropped = _tensors(apr, stream, progress)
        shards = (_source_split(tensors, apr.metadata) if max_shard_size is None else None) \
            or _shard(tensors, limit, apr.metadata)
        with replacing_folder(out_dir, overwrite=force) as tmp:
            report.files, report.config_written = _write_folder(tmp, apr, shards)
            _finish(stream)
    report.tensor_count = len(tensors)
    report.total_size = sum(t.nbytes for t in tensors)
    return report


@contextmanager
def _closing(stream: AprStream) -> Iterator[AprStream]:
    try:
        yield stream
    finally:
        stream.close()
        if stream.verifier is not None:
            stream.verifier.close()


def _verifier(apr: AprFile, verify: bool) -> StreamingVerifier | None:
    return StreamingVerifier(apr, NO_VERIFY_HINT) if verify else None


def _finish(stream: AprStream) -> None:
    """The source's checksum, before anything made from it is published."""
    if stream.verifier is not None:
        stream.verifier.finish()


def export_apr_to_safetensors(
    src: str | os.PathLike,
    dst: str | os.PathLike | BinaryIO,
    *,
    force: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
) -> ExportReport:
    """Write every tensor of `src` (less aprender's tied lm_head copy) into one safetensors file,
    or stream it to a binary stream such as stdout.

    The footer CRC-32 is checked while the bytes stream into the file (which is renamed into place
    only then); a stream cannot be taken back, so for one the file is checked first.

    Returns:
        An ExportReport.

    Raises:
        FooterChecksum: the source is corrupt (unless `verify` is False).
        OutputExists, UnsupportedFeature, InvalidArgument: as for `export_apr_to_hf`.
    """
    src = os.fspath(src)
    stream = dst if hasattr(dst, "write") else None
    dst_name = getattr(dst, "name", "<stream>") if stream is not None else os.fspath(dst)
    if stream is None:
        check_output_file(dst_name, force, example="model.safetensors")
    report = ExportReport(source=src, output=str(dst_name))
    with open_apr(src, use_mmap=False) as apr, _closing(AprStream(apr, _verifier(apr, verify))) as source:
        if stream is not None and source.verifier is not None:
            source.verifier.finish()  # bytes sent down a pipe cannot be taken back: check first
            source.verifier = None
        tensors, report.dropped = _tensors(apr, source, progress)
        meta = _st_metadata(apr.metadata)
        if stream is not None:
            write_safetensors(stream, tensors, meta)
        else:
            with replacing(dst_name, overwrite=force) as out:
                write_safetensors(out, tensors, meta)
                _finish(source)
            report.files = [dst_name]
    report.tensor_count = len(tensors)
    report.total_size = sum(t.nbytes for t in tensors)
    return report


# -- planning ----------------------------------------------------------------------------
def _tensors(apr: AprFile, stream: AprStream, progress: Progress | None) -> tuple[list[OutTensor], list[str]]:
    """The tensors to export, and the names deliberately left out."""
    quantized = [t.name for t in apr.tensors() if t.dtype in QUANTIZED_DTYPES]
    if quantized:
        raise UnsupportedFeature(
            apr.path, f"tensor {quantized[0]!r} is {apr.info(quantized[0]).dtype}: safetensors cannot hold "
            "quantized tensors (convert from the source without --keep-quant)",
        )
    head = tied_head_copy(apr, stream)
    dropped = [head] if head else []
    infos = [info for info in apr.tensors() if info.name not in dropped]
    total = sum(info.nbytes for info in infos)
    out = [
        OutTensor(i.name, DTYPE_BY_NAME[i.dtype].safetensors, i.shape, i.nbytes,
                  _producer(stream, i.name, progress, total))
        for i in infos
    ]
    return out, dropped


def tied_head_copy(apr: AprFile, stream: AprStream) -> str | None:
    """The name of aprender's lm_head copy when the model is tied, else None.

    Raises:
        InvalidArgument: the model is marked tied but its head differs from the embedding.
    """
    meta = apr.metadata
    family = family_of(meta.get("hf_model_type") or meta.get("architecture")) or FAMILIES["llama"]
    head, embed = family.head, family.embed
    if head not in apr or embed not in apr or not is_tied(meta, family):
        return None
    if apr.info(head).nbytes != apr.info(embed).nbytes or not equal_chunks(stream.chunks(head), stream.chunks(embed)):
        raise InvalidArgument(
            apr.path, f"metadata says the embeddings are tied but {head!r} differs from {embed!r}; "
            "set tied_embeddings false or make them equal",
        )
    return head


def _producer(stream: AprStream, name: str, progress: Progress | None, total: int) -> Callable[[], Any]:
    def produce() -> memoryview | FileRange:
        data = stream.file_range(name) or stream.stream(name)  # a kernel-side copy unless zstd-compressed
        if progress is not None:
            progress(name, apr_nbytes(data), total)
        return data

    return produce


def _st_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """safetensors `__metadata__`: the source's, always with {"format": "pt"} (transformers wants it)."""
    source = meta.get(SOURCE_METADATA)
    carried = {k: v for k, v in source.items() if isinstance(v, str)} if isinstance(source, Mapping) else {}
    return {**carried, "format": "pt"}


def _source_split(tensors: list[OutTensor], meta: Mapping[str, Any]) -> dict[str, list[OutTensor]] | None:
    """The source's shard files (name -> tensors) when the stored index covers exactly `tensors`."""
    index = meta.get(HF_INDEX)
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or set(weight_map) != {t.name for t in tensors}:
        return None
    files = set(weight_map.values())
    if len(files) < 2 or not all(isinstance(f, str) and _plain_name(f) and f.endswith(".safetensors") for f in files):
        return None
    split: dict[str, list[OutTensor]] = {f: [] for f in sorted(files)}
    for t in tensors:
        split[weight_map[t.name]].append(t)
    return split


def _plain_name(name: str) -> bool:
    return os.path.basename(name) == name and name not in ("", ".", "..")


def _shard(tensors: list[OutTensor], limit: int, meta: Mapping[str, Any]) -> dict[str, list[OutTensor]]:
    """Greedy split in name order: each shard's file fits `limit` unless one tensor alone exceeds it."""
    st_meta = _st_metadata(meta)
    shards: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    for t in sorted(tensors, key=lambda t: t.name):
        if current and file_size(layout([*current, t]), st_meta) > limit:
            shards.append(current)
            current = []
        current.append(t)
    if current or not shards:
        shards.append(current)
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    return {f"model-{i:05d}-of-{len(shards):05d}.safetensors": shard for i, shard in enumerate(shards, 1)}


# -- writing -----------------------------------------------------------------------------
def _write_folder(tmp: str, apr: AprFile, shards: dict[str, list[OutTensor]]) -> tuple[list[str], bool]:
    meta = apr.metadata
    st_meta = _st_metadata(meta)
    files: list[str] = []
    for name, shard in shards.items():
        _write_file(os.path.join(tmp, name), shard, st_meta)
        files.append(name)
    if len(shards) > 1:
        tensors = [t for shard in shards.values() for t in shard]
        index_meta = {
            "total_parameters": sum(math.prod(t.shape) for t in tensors),
            "total_size": sum(t.nbytes for t in tensors),
        }
        stored = meta.get(HF_INDEX)
        if isinstance(stored, Mapping) and isinstance(stored.get("metadata"), Mapping):
            index_meta = {**stored["metadata"], "total_size": index_meta["total_size"]}
        weight_map = {t.name: name for name, shard in shards.items() for t in shard}
        index = {"metadata": index_meta, "weight_map": dict(sorted(weight_map.items()))}
        _write_text(os.path.join(tmp, INDEX_FILE), json.dumps(index, indent=2, sort_keys=True) + "\n")
        files.append(INDEX_FILE)
    config = hf_config_text(meta)
    if config is not None:
        _write_text(os.path.join(tmp, "config.json"), config)
        files.append("config.json")
    carried = meta.get(HF_FILES)
    for name, text in sorted(carried.items()) if isinstance(carried, Mapping) else []:
        if not isinstance(text, str) or not _plain_name(name) or name in (*shards, INDEX_FILE, "config.json"):
            raise InvalidArgument(apr.path, f"carried file name {name!r} is not a plain file name")
        _write_text(os.path.join(tmp, name), text)
        files.append(name)
    return sorted(files), config is not None


def _write_file(path: str, tensors: list[OutTensor], meta: dict[str, str]) -> None:
    with open(path, "wb", buffering=1024 * 1024) as out:
        write_safetensors(out, tensors, meta)
        out.flush()
        os.fsync(out.fileno())


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as out:
        out.write(text)
