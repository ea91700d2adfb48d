"""A GGUF file as inspect, tensors and diff see it: its key/values, its tensor table, and HF-named float values."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from apr_format.constants import DTYPE_BY_NAME
from apr_format.families import GGUF_ARCHITECTURES, GGUF_CONFIG_KEYS, get_family

from .gguf_to_apr import convert_tensor, map_tensors, plan_tensors, hf_config, open_gguf, read_metadata

_SHOWN_ITEMS = 8  # array values longer than this are summarised (the vocabulary has 50k entries)
_PLAIN = {"F32": "f32", "F16": "f16", "BF16": "bf16", "F64": "f64"}


@dataclass(frozen=True)
class GgufTensor:
    """One entry of the GGUF tensor table; `shape` row-major (numpy order, the reverse of GGUF's ne[])."""

    name: str
    dtype: str  # the GGML type name: F32, Q8_0, Q4_K...
    shape: tuple[int, ...]
    numel: int
    nbytes: int
    offset: int  # absolute byte offset in the file


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], list[GgufTensor]]:
    """The key/values (long arrays summarised) and the tensor table of a GGUF file, in file order.

    Raises:
        CorruptSource: not GGUF, truncated or inconsistent; UnsupportedFeature: no `gguf` package.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    meta = {key: _summarise(value) for key, value in read_metadata(reader, path).items()}
    tensors = [
        GgufTensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                   int(t.n_elements), int(t.n_bytes), int(t.data_offset))
        for t in reader.tensors
    ]
    return meta, tensors


def canonical_summary(meta: dict[str, Any], tensors: list[GgufTensor]) -> dict[str, Any]:
    """The GGUF's architecture numbers under HF config names (model_type, num_hidden_layers, ...)."""
    arch = meta.get("general.architecture")
    config: dict[str, Any] = {"model_type": arch} if isinstance(arch, str) else {}
    for suffix, hf_key in GGUF_CONFIG_KEYS.items():
        value = meta.get(f"{arch}.{suffix}")
        if value is not None:
            config[hf_key] = value
    embed = next((t for t in tensors if t.name == "token_embd.weight"), None)
    if "vocab_size" not in config and embed is not None:
        config["vocab_size"] = embed.shape[0]
    return config


class GgufValues:
    """A llama / qwen2 GGUF under HF names with HF layout, as `apr convert` would write it losslessly:
    plain float tensors as stored, quantized ones dequantized to f32 (q/k rows un-permuted)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        reader = open_gguf(self.path)
        meta = read_metadata(reader, self.path)
        arch = meta.get("general.architecture")
        family = get_family(GGUF_ARCHITECTURES.get(arch, str(arch)), self.path)
        tensors, _ = map_tensors(reader, self.path)
        self.config = hf_config(meta, arch, tensors, self.path)
        entries = plan_tensors(tensors, self.config, family.name, family.gguf_qk_permuted, None, False, self.path)
        self._entries = {e.name: e for e in entries}
        # the dtype as stored: f32 / f16 / bf16 for plain floats, the GGML type (Q8_0, Q4_K...) for blocks
        self.infos = {e.name: (_PLAIN.get(e.tensor.tensor_type.name, e.tensor.tensor_type.name), e.shape)
                      for e in entries}

    def nbytes(self, name: str) -> int:
        entry = self._entries[name]
        return math.prod(entry.shape) * DTYPE_BY_NAME[entry.dtype].itemsize

    def output_dtype(self, name: str) -> str:
        """The dtype of the bytes `chunks` yields (f32 for dequantized blocks)."""
        return self._entries[name].dtype

    def chunks(self, name: str, step: int) -> Iterator[memoryview]:
        """The tensor's values (HF layout) as bytes, in chunks of `step`."""
        data = memoryview(np.ascontiguousarray(convert_tensor(self._entries[name], self.path))).cast("B")
        for start in range(0, len(data), step):
            yield data[start : start + step]

    def close(self) -> None:
        """Nothing to release beyond gguf-py's own mapping (freed with the reader)."""
        self._entries = {}


def _summarise(value: Any) -> Any:
    if isinstance(value, list) and len(value) > _SHOWN_ITEMS:
        return f"<array of {len(value)} items>"
    return value
