""".apr -> .apr re-encoding: cast float dtypes, compress or decompress, drop or add the tied lm_head copy."""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apr_format import AprFile, AprWriter, Flag, open_apr
from apr_format.constants import DTYPE_BY_NAME, FLOAT_DTYPES
from apr_format.destination import check_output_file
from apr_format.errors import InvalidArgument
from apr_format.families import FAMILIES, family_of, is_tied
from apr_format.fileio import CHUNK_VALUES, equal_chunks
from apr_format.integrity import StreamingVerifier
from apr_format.param_count import count_parameters

from .apr_to_hf import NO_VERIFY_HINT
from .dtype_cast import cast_chunks
from .hf_to_apr import TARGET_DTYPES, ConversionReport, Progress, with_dtype
from .source_files import AprStream
from .metadata import HF_CONFIG, HF_CONFIG_TEXT

KEEP = "keep"  # compression / head copy: as the source has it


@dataclass(frozen=True)
class _Planned:
    name: str  # output name
    source: str  # the source tensor whose bytes are written (the embedding for an added head copy)
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_BY_NAME[self.dtype].nbytes_for(_numel(self.shape))


def reencode_apr(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    dtype: str | None = None,
    compression: str | None = KEEP,
    lm_head_copy: bool | None = None,
    force: bool = False,
    progress: Progress | None = None,
    verify: bool = True,
) -> ConversionReport:
    """Write `dst` from the .apr `src`, changing only what is asked.

    `dtype` (f32/f16/bf16) casts float tensors (quantized and integer tensors stay as they are);
    `compression` is "zstd", None (uncompressed) or "keep"; `lm_head_copy` True adds aprender's
    `lm_head.weight` copy to a tied model, False drops it, None keeps what the source has. The
    source's footer CRC-32 is checked while its bytes stream, before `dst` appears.

    Returns:
        A ConversionReport (with `warnings` naming what was left as it was).

    Raises:
        FooterChecksum: the source is corrupt (unless `verify` is False); nothing is written.
        OutputExists, InvalidArgument: as for `convert_hf_to_apr`; a head to drop that is no copy.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if dtype is not None and dtype not in TARGET_DTYPES:
        raise InvalidArgument(dst, f"--dtype {dtype!r} is not one of {', '.join(TARGET_DTYPES)}")
    check_output_file(dst, force, src=src)
    with open_apr(src, use_mmap=False) as apr:
        verifier = StreamingVerifier(apr, NO_VERIFY_HINT) if verify else None
        stream = AprStream(apr, verifier)
        try:
            plan, notes = _plan(apr, stream, dtype, lm_head_copy)
            if compression == KEEP:
                compression = "zstd" if apr.flags & Flag.ZSTD else None
            meta = _metadata(apr.metadata, plan, dtype, apr)
            flags = int(apr.flags) & ~int(Flag.ZSTD | Flag.QUANTIZED | Flag.LAYOUT_ROW_MAJOR)
            total = sum(p.nbytes for p in plan)
            writer = AprWriter(dst, meta, compression=compression, flags=flags, overwrite=force,
                               before_publish=verifier.finish if verifier is not None else None)
            for p in plan:
                writer.add(p.name, _producer(apr, stream, p, progress, total), dtype=p.dtype, shape=p.shape)
            writer.close()
        finally:
            stream.close()
            if verifier is not None:
                verifier.close()
        counted = count_parameters(meta, {p.name: p.shape for p in plan})
    return ConversionReport(
        source=src, output=dst, architecture=apr.metadata.get("architecture"), family=None,
        tensor_count=len(plan), param_count=counted.distinct, total_size=total, bytes_written=os.path.getsize(dst),
        dtype=dtype, dtypes=dict(sorted(Counter(p.dtype for p in plan).items())),
        lm_head_copy=counted.tied_copy is not None, warnings=notes, source_verified=verify,
    )


def _plan(apr: AprFile, stream: AprStream, dtype: str | None, lm_head_copy: bool | None) -> tuple[list[_Planned], list[str]]:
    meta = apr.metadata
    family = family_of(meta.get("hf_model_type") or meta.get("architecture")) or FAMILIES["llama"]
    head, embed = family.head, family.embed
    tied = is_tied(meta, family) and embed in apr
    notes: list[str] = []

    def target(source: str) -> str:
        stored = apr.info(source).dtype
        return dtype if dtype is not None and stored in FLOAT_DTYPES else stored

    plan = [_Planned(t.name, t.name, target(t.name), t.shape) for t in apr.tensors()]
    if dtype is not None:
        kept = sorted({t.dtype for t in apr.tensors() if t.dtype not in FLOAT_DTYPES})
        if kept:
            notes.append(f"{', '.join(kept)} tensors kept as they are (--dtype casts float tensors only)")
    if lm_head_copy is False and head in apr:
        if not tied:
            raise InvalidArgument(apr.path, f"{head} is the model's own head (the embeddings are not tied); "
                                            "it cannot be dropped")
        if not (apr.info(head).nbytes == apr.info(embed).nbytes
                and equal_chunks(stream.chunks(head), stream.chunks(embed))):
            raise InvalidArgument(apr.path, f"metadata says the embeddings are tied but {head} differs from {embed}")
        plan = [p for p in plan if p.name != head]
    elif lm_head_copy is True and head not in apr:
        if not tied:
            raise InvalidArgument(apr.path, "--lm-head-copy needs a model with tied embeddings")
        plan.append(_Planned(head, embed, target(embed), apr.info(embed).shape))
        plan.sort(key=lambda p: p.name.encode("utf-8"))
    return plan, notes


def _metadata(meta: dict[str, Any], plan: list[_Planned], dtype: str | None, apr: AprFile) -> dict[str, Any]:
    out = dict(meta)  # same keys in the same order: re-encoding twice gives back the bytes
    out["total_size"] = sum(p.nbytes for p in plan)
    if dtype is not None and any(p.dtype != apr.info(p.source).dtype for p in plan):
        if isinstance(meta.get(HF_CONFIG), dict):
            out[HF_CONFIG] = with_dtype(meta[HF_CONFIG], dtype)
        out.pop(HF_CONFIG_TEXT, None)  # the verbatim text would contradict the new dtype
    return out


def _producer(apr: AprFile, stream: AprStream, p: _Planned, progress: Progress | None, total: int) -> Callable[[], Any]:
    def produce():
        stored = apr.info(p.source).dtype
        if p.dtype == stored:  # bytes as they are: a kernel-side copy unless the source is compressed
            data = stream.file_range(p.source) or stream.stream(p.source)
        else:
            step = CHUNK_VALUES * DTYPE_BY_NAME[stored].itemsize
            data = cast_chunks(stream.chunks(p.source, step), stored, p.dtype, _numel(p.shape))
        if progress is not None:
            progress(p.name, p.nbytes, total)
        return data

    return produce


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
