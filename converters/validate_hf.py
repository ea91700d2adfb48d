"""`apr validate` for a .safetensors file or an HF folder: header bounds, dtype x shape sizes, overlaps,
shard index against shards, NaN/Inf scan; the same report as for an .apr."""

from __future__ import annotations

import os

from apr_format.constants import DTYPE_BY_NAME
from apr_format.errors import AprError
from apr_format.fileio import CHUNK
from apr_format.validate import NonFinite, ValidationReport, count_nonfinite

from .hf_source import CONFIG_FILE, INDEX_FILE, HfSource, open_hf_source

_SCANNED = ("f16", "bf16", "f32", "f64")


def validate_hf(path: str | os.PathLike) -> ValidationReport:
    """Run every check on a .safetensors file or HF folder; problems become FAIL checks.

    Returns:
        A ValidationReport (format "safetensors" or "hf"); checks after a failed parse are skipped.

    Raises:
        FileMissing / Unreadable: the path cannot be opened at all.
    """
    path = os.fspath(path)
    folder = os.path.isdir(path)
    report = ValidationReport(path, format="hf" if folder else "safetensors")
    try:
        source = open_hf_source(path)
    except OSError:  # missing or unreadable (FileMissing is an OSError too): an error, exit 2, not a failed check
        raise
    except AprError as exc:
        report.add(_stage(exc, path), False, f"{_where(exc, path)}{exc.problem}")
        return report
    with source:
        report.total_tensors = len(source.tensors)
        if folder:
            report.add("config", source.config is not None,
                       f"{CONFIG_FILE}: {source.config.get('model_type', 'no model_type')}" if source.config
                       else f"no {CONFIG_FILE} (architecture unknown)")
        report.add("headers", True, f"{len(source.files)} file(s): header lengths, JSON and __metadata__ well formed")
        report.add("tensor bounds", True, f"{len(source.tensors)} tensors: sizes match dtype x shape, every tensor "
                                          "inside its file's data section, no overlaps")
        if source.index is not None:
            orphans = sorted(set(_weight_files(path)) - {os.path.basename(f) for f in source.files})
            report.add("shard index", not orphans,
                       f"{', '.join(orphans)}: weight file(s) in the folder that the index does not name "
                       "(their tensors would be ignored)" if orphans
                       else f"{len(source.index['weight_map'])} entries name exactly the tensors of "
                            f"{len(source.files)} shards")
        _scan(report, source)
    return report


def _scan(report: ValidationReport, source: HfSource) -> None:
    scanned = 0
    for name, tensor in source.tensors.items():
        if tensor.dtype not in _SCANNED:
            continue
        nan = inf = 0
        for chunk in source.chunks(name, CHUNK):  # chunk sizes are whole elements
            n, i = count_nonfinite(chunk, tensor.dtype, len(chunk) // DTYPE_BY_NAME[tensor.dtype].itemsize)
            nan, inf = nan + n, inf + i
        scanned += 1
        if nan or inf:
            report.nonfinite.append(NonFinite(name, tensor.dtype, nan, inf))
            report.total_nan += nan
            report.total_inf += inf
    if report.nonfinite:
        worst = max(report.nonfinite, key=lambda t: t.nan + t.inf)
        detail = (f"{report.total_nan} NaN and {report.total_inf} Inf in {len(report.nonfinite)} tensors "
                  f"(most in {worst.name!r}: {worst.nan} NaN, {worst.inf} Inf)")
    else:
        detail = f"no NaN or Inf in {scanned} float tensors"
    report.add("nan/inf", not report.nonfinite, detail)


def _weight_files(folder: str) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".safetensors")]


def _stage(exc: AprError, path: str) -> str:
    where = exc.path or ""
    if where.endswith(INDEX_FILE):
        return "shard index"
    if where.endswith(CONFIG_FILE):
        return "config"
    return "headers" if "header" in exc.problem else "tensor bounds"


def _where(exc: AprError, path: str) -> str:
    """The file inside a folder the problem is in, when it is not the folder itself."""
    return f"{os.path.basename(exc.path)}: " if exc.path and exc.path != path else ""
