"""Checkpoint tensors for a model's parameters: `expected_parameter_shapes` and `load_init_tensors`."""

from __future__ import annotations

import os
import re
import struct
import warnings
from collections.abc import Iterator
from typing import Any

from .architecture import ArchitectureConfig, architecture_of
from .constants import DTYPE_BY_NAME, FLOAT_DTYPES, FOOTER_SIZE, QUANTIZED_DTYPES, Flag
from .errors import FooterChecksum, InvalidArgument, MissingTensor, NonFiniteWeights, ShapeMismatch
from .families import TENSORS_PER_LAYER
from .fileio import CHUNK, equal_chunks
from .integrity import footer_mismatch
from .validate import checksum_pass, count_nonfinite
from .reader import AprFile, TensorInfo, open_apr
from .rows import OpenFile, StoredRows
from .sourceio import read_into

# Tensors some HF checkpoints carry that no model parameter corresponds to and that are
# recomputed from the config: reported as unused, never an error.
_HARMLESS_SUFFIXES = (".rotary_emb.inv_freq",)
# Names under these prefixes are decoder parameters: if the architecture does not use one, the
# metadata and the weights disagree (aprender once dropped all 72 Qwen q/k/v biases this way).
_PARAMETER_PREFIXES = ("model.", "lm_head.")
_PARAMETER_DTYPES = frozenset((*FLOAT_DTYPES, *QUANTIZED_DTYPES))  # k-quants: refused later
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_NAMES_SHOWN = 8


def expected_parameter_shapes(config: ArchitectureConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter the model of `config` has, HF name -> shape, in model order (the family table's).

    There is no `lm_head.weight` when the embeddings are tied: the head reuses
    `model.embed_tokens.weight`.
    """
    return config.parameter_shapes()


class InitTensors(dict):
    """name -> torch.Tensor (or `StoredRows`, when loaded on demand) for every model parameter, plus
    what the file had beyond them.

    Attributes:
        unused: names of file tensors no parameter uses (harmless buffers and foreign
            tensors), also announced with one `UnusedTensorWarning`.
        dropped_tied_head: True when the file's `lm_head.weight` was a byte-identical copy of
            the embedding (aprender's tied convention) and was dropped.
        source_dtypes: name -> dtype as stored in the file ('bf16', 'q8', ...).
    """

    unused: tuple[str, ...] = ()
    dropped_tied_head: bool = False
    source_dtypes: dict[str, str]


class UnusedTensorWarning(UserWarning):
    """The checkpoint holds tensors the model does not use."""


def load_init_tensors(
    path: str | os.PathLike,
    config: ArchitectureConfig | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    on_demand: bool = False,
) -> InitTensors:
    """Every tensor of the .apr at `path` keyed by the model's parameter names, shapes checked.

    Args:
        config: the architecture to load for; default: the file's own (`read_architecture`).
        dtype: a torch dtype (or its name, "bfloat16" / "bf16") to cast to; None keeps the
            file's dtype. Quantized q4/q8 tensors are dequantized to float32 first.
        device: where the tensors go. The bytes are read with pread into memory the tensors own
            (on "cpu" with the file's dtype, no further copy): a file cut short or rewritten by
            another program, during loading or later in training, is a `Truncated` error or
            nothing at all, never SIGBUS.
        on_demand: give each plain (unquantized, uncompressed) tensor as a `StoredRows` that reads
            its rows only when asked (`[start:stop]`, `[...]`), from the file checked here: what a
            training rank uses to hold only its own shard. Needs `dtype` None and `device` "cpu".

    Raises:
        MissingTensor / ShapeMismatch: one error naming every missing, mis-shaped or
            non-float tensor (MissingTensor when anything is missing).
        InvalidArgument: the file holds decoder parameters the architecture does not use
            (e.g. q/k/v biases while attention_bias is false, extra layers, or an
            lm_head.weight that differs from the embedding of a tied model).
        UnsupportedArchitecture, MissingConfigKey, UnsupportedFeature: from the architecture.
        FooterChecksum: the file's CRC-32 does not match its bytes (it is read once to check).
        NonFiniteWeights: a parameter holds NaN or Inf (named with the counts).
        Truncated: the file was cut short while being read.
    """
    target_dtype = _torch_dtype(dtype, path)
    if on_demand and (target_dtype is not None or str(device) != "cpu"):
        raise InvalidArgument(path, "on_demand loading keeps the file's dtype on the CPU (dtype None, device 'cpu')")
    with open_apr(path, use_mmap=False) as f:
        if config is None:
            config = architecture_of(f.metadata, f.keys(), f.path)
        _check_layer_count(f, config)
        expected = expected_parameter_shapes(config)
        dropped_head = config.tie_word_embeddings and _is_tied_copy(f)
        _check_names_and_shapes(f, expected, dropped_head)
        # One read: a flipped bit or a NaN in the weights must stop training before it starts.
        nonfinite = _check_bytes(f, expected)
        result = InitTensors()
        result.source_dtypes = {name: f.info(name).dtype for name in expected}
        # zstd tensors are inflated into immutable bytes: copy them so training may write.
        compressed = bool(f.flags & Flag.ZSTD)
        shared = OpenFile(os.dup(f.fileno()), f.path) if on_demand and not compressed else None
        for name in expected:
            info = f.info(name)
            if shared is not None and info.dtype not in QUANTIZED_DTYPES:  # NaN/Inf counted by _check_bytes
                result[name] = StoredRows(shared, f.header.data_offset + info.offset, info.dtype, info.shape)
                continue
            stored = f.torch(name)
            tensor = stored.to(device=device, dtype=target_dtype or stored.dtype)
            result[name] = tensor.clone() if compressed and tensor.data_ptr() == stored.data_ptr() else tensor
            if name not in nonfinite:  # quantized or compressed: not scanned in the read pass
                nonfinite[name] = count_nonfinite(f.raw(name), info.dtype, info.numel)
        _refuse_nonfinite(f.path, nonfinite)
        skipped = {"lm_head.weight"} if dropped_head else set()
        result.unused = tuple(n for n in f.keys() if n not in expected and n not in skipped)
        result.dropped_tied_head = dropped_head
    if result.unused:
        warnings.warn(
            f"{os.fspath(path)}: {len(result.unused)} tensor(s) not used by the model: {_names(result.unused)}",
            UnusedTensorWarning,
            stacklevel=2,
        )
    return result


def _check_bytes(f: AprFile, expected: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """Footer CRC-32 and NaN/Inf counts of the parameters, from one read of the file.

    Raises:
        FooterChecksum: the stored CRC does not match.
    """

    with os.fdopen(os.dup(f.fileno()), "rb") as fh:  # the file `f` opened, even if its path was replaced
        crc, counts = checksum_pass(fh, f)
        fh.seek(f.file_size - FOOTER_SIZE)
        (stored,) = struct.unpack("<I", fh.read(FOOTER_SIZE))
    if crc != stored:
        raise FooterChecksum(f.path, footer_mismatch(stored, crc, f.trailing_bytes))
    return {name: count for name, count in counts.items() if name in expected}


def _refuse_nonfinite(path: str, counts: dict[str, tuple[int, int]]) -> None:
    bad = {name: c for name, c in counts.items() if c[0] or c[1]}
    if not bad:
        return
    shown = [f"{_printable(name)} ({nan} NaN, {inf} Inf)" for name, (nan, inf) in list(bad.items())[:_NAMES_SHOWN]]
    more = f" (+{len(bad) - _NAMES_SHOWN} more)" if len(bad) > _NAMES_SHOWN else ""
    raise NonFiniteWeights(path, f"{len(bad)} tensor(s) hold non-finite weights, refusing to train from them: "
                                 f"{', '.join(shown)}{more}")


def _check_layer_count(f: AprFile, config: ArchitectureConfig) -> None:
    """Refuse more layers than the file has tensors before listing the parameters: a hostile
    `num_layers` of 10**9 would otherwise build a table of billions of names (below that bound
    the listing costs no more than the index, and names every missing tensor)."""
    if config.num_layers > len(f):
        needed = TENSORS_PER_LAYER * config.num_layers + 2
        found = sorted({int(m.group(1)) for m in map(_LAYER.search, f.keys()) if m})
        raise MissingTensor(
            f.path, f"checkpoint does not match the architecture: {config.num_layers} layers need at least "
            f"{needed} tensors, the file has {len(f)} (layers found: {_ranges(found) if found else 'none'})",
        )


def _check_names_and_shapes(f: AprFile, expected: dict[str, tuple[int, ...]], dropped_head: bool) -> None:
    present = set(f.keys())
    missing = [n for n in expected if n not in present]
    wrong = [
        f"{n} is {list(f.info(n).shape)}, expected {list(shape)}"
        for n, shape in expected.items()
        if n in present and f.info(n).shape != shape
    ]
    wrong += [
        f"{n} is {f.info(n).dtype}, expected a float or q4/q8 dtype"
        for n in expected
        if n in present and f.info(n).dtype not in _PARAMETER_DTYPES
    ]
    foreign = [
        n for n in f.keys()
        if n not in expected
        and n.startswith(_PARAMETER_PREFIXES)
        and not n.endswith(_HARMLESS_SUFFIXES)
        and not (dropped_head and n == "lm_head.weight")
    ]
    if not (missing or wrong or foreign):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_describe(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s) or dtype(s): {_describe(wrong)}")
    if foreign:
        hint = (
            " (lm_head.weight differs from model.embed_tokens.weight but the metadata says the embeddings are tied)"
            if "lm_head.weight" in foreign else ""
        )
        problems.append(f"{len(foreign)} parameter(s) the architecture does not use: {_describe(foreign)}{hint}")
    error = MissingTensor if missing else ShapeMismatch if wrong else InvalidArgument
    raise error(f.path, "checkpoint does not match the architecture: " + "; ".join(problems))


def _is_tied_copy(f: AprFile) -> bool:
    """Whether `lm_head.weight` is a byte-identical copy of the embedding (aprender's tie)."""
    if "lm_head.weight" not in f or "model.embed_tokens.weight" not in f:
        return False
    head, embed = f.info("lm_head.weight"), f.info("model.embed_tokens.weight")
    if (head.dtype, head.shape, head.nbytes) != (embed.dtype, embed.shape, embed.nbytes):
        return False
    return equal_chunks(_chunks(f, head), _chunks(f, embed))  # stops at the first difference


def _chunks(f: AprFile, info: TensorInfo) -> Iterator[memoryview]:
    """A tensor's decoded bytes, CHUNK at a time into one reused buffer (each chunk is valid until the
    next is asked for); a compressed tensor is inflated whole."""
    if f.flags & Flag.ZSTD:
        raw = f.raw(info.name)
        yield from (raw[pos : pos + CHUNK] for pos in range(0, len(raw), CHUNK))
        return
    start, buf = f.header.data_offset + info.offset, memoryview(bytearray(min(CHUNK, info.size)))
    for pos in range(0, info.size, CHUNK):
        chunk = buf[: min(CHUNK, info.size - pos)]
        read_into(f.fileno(), start + pos, chunk, f.path)
        yield chunk


def _torch_dtype(dtype: Any, path):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    known = DTYPE_BY_NAME.get(str(dtype))
    name = known.torch if known is not None and known.torch else str(dtype)
    resolved = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise InvalidArgument(path, f"dtype {dtype!r} is not a floating-point torch dtype")
    return resolved


def _describe(items: list[str]) -> str:
    """Every item, with layer numbers collapsed: `model.layers.{0-23}.self_attn.q_proj.bias`."""
    groups: dict[str, list[int]] = {}
    for item in map(_printable, items):
        match = _LAYER.search(item)
        key = _LAYER.sub(".layers.\0.", item, count=1)
        groups.setdefault(key, []).extend([int(match.group(1))] if match else [])
    return ", ".join(key.replace("\0", _ranges(layers)) for key, layers in groups.items())


def _ranges(numbers: list[int]) -> str:
    numbers, spans = sorted(set(numbers)), []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ",".join(str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}-{b}" for a, b in spans)
    return "{" + text + "}" if len(numbers) > 1 else text


def _printable(name: str) -> str:
    """`name` with control and other non-printable characters escaped (names come from the file)."""
    return name if name.isprintable() else repr(name)[1:-1]


def _names(names) -> str:
    names = [_printable(n) for n in names]
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (f" (+{len(names) - _NAMES_SHOWN} more)" if len(names) > _NAMES_SHOWN else "")
