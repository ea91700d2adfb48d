"""Compare two checkpoints (.apr, .safetensors, HF folders) tensor by tensor, streaming, without torch."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from apr_format import AprFile, open_apr
from apr_format.constants import DTYPE_BY_NAME
from apr_format.families import FAMILIES, Family, family_of, is_tied, map_config
from apr_format.fileio import CHUNK, CHUNK_VALUES, equal_chunks
from apr_format.integrity import StreamingVerifier
from apr_format.sniff import identify

from .apr_to_hf import NO_VERIFY_HINT
from .dtype_cast import to_float
from .gguf_source import GgufValues
from .hf_source import HfSource, open_hf_source
from .source_files import AprStream

# Keys that say where and when a file was made, not what it holds: reported, never counted.
IGNORED_KEYS = frozenset(("created_at", "source", "name"))
# Keys compared between an HF config and .apr metadata (HF keys mapped through CONFIG_KEYS).
ARCH_KEYS = (
    "architecture", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "intermediate_size",
    "max_position_embeddings", "rope_theta", "rms_norm_eps", "head_dim", "tied_embeddings",
)
_SHORT = 120

Progress = Callable[[str, int, int], None]  # (tensor name, its bytes, total bytes)


@dataclass
class TensorDiff:
    """Comparison of one tensor present in both checkpoints."""

    name: str
    dtype: tuple[str, str]
    shape: tuple[tuple[int, ...], tuple[int, ...]]
    bytes_identical: bool
    max_abs_diff: float | None = None  # None when values cannot be compared (shape, packed quant)
    rel_l2: float | None = None  # ||a - b|| / ||a||
    nan_mismatches: int = 0

    @property
    def identical(self) -> bool:
        return self.bytes_identical and self.dtype[0] == self.dtype[1] and self.shape[0] == self.shape[1]


@dataclass
class DiffResult:
    """Everything `apr diff` reports; `difference_count` counts what makes A and B differ."""

    a: str
    b: str
    kinds: tuple[str, str]
    metadata_mode: str  # "full", "config", "architecture" or "none"
    metadata_differences: list[dict[str, Any]] = field(default_factory=list)
    metadata_ignored: list[str] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.identical]

    @property
    def difference_count(self) -> int:
        return len(self.metadata_differences) + len(self.only_in_a) + len(self.only_in_b) + len(self.changed)

    @property
    def identical(self) -> bool:
        return self.difference_count == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: `identical`, `difference_count`, then the details."""
        tensors = []
        for t in self.tensors:
            entry = asdict(t)
            entry.update(identical=t.identical, dtype=list(t.dtype), shape=[list(s) for s in t.shape])
            for key in ("max_abs_diff", "rel_l2"):  # JSON has no inf / nan
                if entry[key] is not None and not math.isfinite(entry[key]):
                    entry[key] = str(entry[key])
            tensors.append(entry)
        return {
            "a": self.a, "b": self.b, "kinds": list(self.kinds),
            "identical": self.identical, "difference_count": self.difference_count,
            "metadata": {"compared": self.metadata_mode, "differences": self.metadata_differences,
                         "ignored": self.metadata_ignored},
            "only_in_a": self.only_in_a, "only_in_b": self.only_in_b,
            "tensor_summary": {"common": len(self.tensors), "identical": len(self.tensors) - len(self.changed),
                               "different": len(self.changed)},
            "tensors": tensors, "notes": self.notes,
        }


class _Side:
    """One checkpoint behind a common face: metadata, tensor infos, bytes and float values."""

    def __init__(self, path: str, verify: bool) -> None:
        self.path = path
        self.apr: AprFile | None = None
        self.hf: HfSource | None = None
        self.gguf: GgufValues | None = None
        kind = identify(path)
        if kind == "gguf":
            self.gguf = GgufValues(path)
            self.kind = "gguf"
            self.infos = dict(self.gguf.infos)
        elif kind in ("apr", "apr-v1"):  # open_apr names a v1 file
            self.apr = open_apr(path, use_mmap=False)
            self.stream = AprStream(self.apr, StreamingVerifier(self.apr, NO_VERIFY_HINT) if verify else None)
            self.kind = "apr"
            self.infos = {t.name: (t.dtype, t.shape) for t in self.apr.tensors()}
        else:
            self.hf = open_hf_source(path)
            self.kind = "hf" if self.hf.config is not None else "safetensors"
            self.infos = {n: (t.dtype, t.shape) for n, t in self.hf.tensors.items()}

    @property
    def metadata(self) -> dict[str, Any]:
        if self.gguf is not None:
            return dict(self.gguf.config)
        return dict(self.apr.metadata) if self.apr is not None else dict(self.hf.config or {})

    def family(self) -> Family:
        meta = self.metadata
        name = meta.get("hf_model_type") or meta.get("architecture") or meta.get("model_type")
        return family_of(name) or FAMILIES["llama"]

    def tied(self) -> bool:
        return is_tied(self.metadata, self.family())

    def arch(self) -> dict[str, Any]:
        """The architecture keys, HF configs mapped to APR names, defaults filled in."""
        meta = self.metadata
        if self.apr is not None:
            out = {k: meta.get(k) for k in ARCH_KEYS}
        else:
            out = {k: None for k in ARCH_KEYS}
            out.update(map_config(meta))
            out["architecture"] = meta.get("model_type")
            family = family_of(meta.get("model_type"))
            for key, value in (family.defaults if family else {}).items():
                out[key] = value if out.get(key) is None else out[key]
        out["tied_embeddings"] = self.tied()
        if out.get("num_kv_heads") is None:
            out["num_kv_heads"] = out.get("num_heads")
        if out.get("head_dim") is None and isinstance(out.get("hidden_size"), int) and out.get("num_heads"):
            out["head_dim"] = out["hidden_size"] // out["num_heads"]
        return out

    def nbytes(self, name: str) -> int:
        if self.gguf is not None:
            return self.gguf.nbytes(name)
        return self.apr.info(name).nbytes if self.apr is not None else self.hf.tensors[name].nbytes

    def chunks(self, name: str, step: int):
        source = self.gguf if self.gguf is not None else self.stream if self.apr is not None else self.hf
        return source.chunks(name, step)

    def float_chunks(self, name: str):
        """Float64 chunks of the tensor's values (q4 / q8 and GGUF blocks dequantized whole)."""
        dtype, _ = self.infos[name]
        if self.gguf is not None:
            dtype = self.gguf.output_dtype(name)
            for chunk in self.gguf.chunks(name, CHUNK_VALUES * DTYPE_BY_NAME[dtype].itemsize):
                yield to_float(chunk, dtype, "<f8")
            return
        if DTYPE_BY_NAME[dtype].quantized:
            yield self.apr.to_float32(name).reshape(-1).astype(np.float64)
            return
        for chunk in self.chunks(name, CHUNK_VALUES * DTYPE_BY_NAME[dtype].itemsize):
            yield to_float(chunk, dtype, "<f8")

    def finish(self) -> None:
        """Check the footer CRC-32 of an .apr side, from the bytes compared (and the rest)."""
        if self.apr is not None and self.stream.verifier is not None:
            self.stream.verifier.finish()

    def close(self) -> None:
        if self.apr is not None:
            self.stream.close()
            if self.stream.verifier is not None:
                self.stream.verifier.close()
        source = next(s for s in (self.gguf, self.apr, self.hf) if s is not None)  # an empty AprFile is falsy
        source.close()


def diff_checkpoints(
    a: str | os.PathLike, b: str | os.PathLike, *, progress: Progress | None = None, verify: bool = True
) -> DiffResult:
    """Compare checkpoints `a` and `b` (.apr, .safetensors or HF folder, any combination).

    The footer CRC-32 of an .apr side is computed from the bytes compared (no second pass) unless
    `verify` is False: a corrupt file is an error, never "different" or "identical".

    Returns:
        A DiffResult (`identical`, `difference_count`, per-tensor figures, `to_dict()`).

    Raises:
        FooterChecksum: an .apr side is corrupt.
        AprError subclasses for unreadable inputs.
    """
    a, b = os.fspath(a), os.fspath(b)
    side_a = _Side(a, verify)
    try:
        side_b = _Side(b, verify)
    except BaseException:
        side_a.close()
        raise
    try:
        result = DiffResult(a=a, b=b, kinds=(side_a.kind, side_b.kind), metadata_mode="none")
        _compare_metadata(side_a, side_b, result)
        _compare_names(side_a, side_b, result)
        common = sorted(set(side_a.infos) & set(side_b.infos))
        total = sum(side_a.nbytes(name) for name in common)
        for name in common:
            result.tensors.append(_compare_tensor(side_a, side_b, name))
            if progress is not None:
                progress(name, side_a.nbytes(name), total)
        side_a.finish()
        side_b.finish()
        return result
    finally:
        side_a.close()
        side_b.close()


def _compare_metadata(a: _Side, b: _Side, result: DiffResult) -> None:
    if "safetensors" in (a.kind, b.kind):
        result.notes.append("metadata not compared: a bare .safetensors file has no config")
        return
    if a.kind == b.kind:
        result.metadata_mode = "full" if a.kind == "apr" else "config"
        meta_a, meta_b = a.metadata, b.metadata
    else:
        result.metadata_mode = "architecture"
        meta_a, meta_b = a.arch(), b.arch()
        result.notes.append("HF config compared with .apr metadata through the architecture keys only")
    for key, va, vb in _differences(meta_a, meta_b):
        if key in IGNORED_KEYS:
            result.metadata_ignored.append(key)
        else:
            result.metadata_differences.append({"key": key, "a": _short(va), "b": _short(vb)})


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = ""):
    """(dotted key, a value, b value) for every differing key, descending into nested objects."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if _same_value(va, vb):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            yield from _differences(va, vb, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", va, vb


def _compare_names(a: _Side, b: _Side, result: DiffResult) -> None:
    only_a = sorted(set(a.infos) - set(b.infos))
    only_b = sorted(set(b.infos) - set(a.infos))
    for side, only in ((a, only_a), (b, only_b)):
        family = side.family()
        if family.head not in only or family.embed not in side.infos or not side.tied():
            continue
        if side.nbytes(family.head) == side.nbytes(family.embed) and equal_chunks(
            side.chunks(family.head, CHUNK), side.chunks(family.embed, CHUNK)
        ):
            only.remove(family.head)
            result.notes.append(
                f"{family.head} in {side.path} is aprender's copy of {family.embed} (tied embeddings); not counted"
            )
    result.only_in_a, result.only_in_b = only_a, only_b


def _compare_tensor(a: _Side, b: _Side, name: str) -> TensorDiff:
    (dtype_a, shape_a), (dtype_b, shape_b) = a.infos[name], b.infos[name]
    same_layout = dtype_a == dtype_b and shape_a == shape_b
    identical = same_layout and equal_chunks(a.chunks(name, CHUNK), b.chunks(name, CHUNK))
    diff = TensorDiff(name, (dtype_a, dtype_b), (shape_a, shape_b), identical)
    if identical:
        diff.max_abs_diff, diff.rel_l2 = 0.0, 0.0
    elif shape_a == shape_b and not {dtype_a, dtype_b} & {"q4_k", "q6_k"}:
        diff.max_abs_diff, diff.rel_l2, diff.nan_mismatches = _numeric(a, b, name)
    return diff


def _numeric(a: _Side, b: _Side, name: str) -> tuple[float, float, int]:
    """Max |a-b|, ||a-b|| / ||a|| and the count of NaN positions that do not match, chunk by chunk."""
    max_abs, diff_sq, ref_sq, nan_mismatch = 0.0, 0.0, 0.0, 0
    for ca, cb in _zip_chunks(a.float_chunks(name), b.float_chunks(name)):
        nan_a, nan_b = np.isnan(ca), np.isnan(cb)
        nan_mismatch += int(np.count_nonzero(nan_a != nan_b))
        keep = ~(nan_a | nan_b)
        ca, cb = ca[keep], cb[keep]
        with np.errstate(invalid="ignore", over="ignore"):
            d = np.where(ca == cb, 0.0, np.abs(ca - cb))  # equal infinities count as equal
            if d.size:
                max_abs = max(max_abs, float(np.max(d)))
            diff_sq += float(np.dot(d, d))
            ref_sq += float(np.dot(ca, ca))
    rel = math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return max_abs, rel, nan_mismatch


def _zip_chunks(gen_a, gen_b):
    """Pairs of equal-length chunks from two generators that may cut at different points."""
    buf_a, buf_b = np.empty(0), np.empty(0)
    for chunk in gen_a:
        buf_a = np.concatenate([buf_a, chunk]) if buf_a.size else chunk
        while buf_b.size < buf_a.size:
            nxt = next(gen_b, None)
            if nxt is None:
                break
            buf_b = np.concatenate([buf_b, nxt]) if buf_b.size else nxt
        n = min(buf_a.size, buf_b.size)
        yield buf_a[:n], buf_b[:n]
        buf_a, buf_b = buf_a[n:], buf_b[n:]


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)
    return a == b


def _short(value: Any) -> Any:
    """The value, or a summary with a digest when its JSON is long (vocabularies, carried files)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    if len(text) <= _SHORT:
        return value
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    size = f"{len(value)} items" if isinstance(value, (list, dict)) else f"{len(text)} chars"
    return f"<{type(value).__name__} of {size}, sha256 {digest}>"



