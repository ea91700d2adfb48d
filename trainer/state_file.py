"""Training-state tensors as a safetensors file: streamed out one tensor at a time, read back by slices.

safetensors' own `save_file` needs every tensor on the CPU at once and writes through a temp file
of its own that a killed run would leave behind; here the caller owns the (atomic) file and memory
stays bounded by the largest tensor, which may be fetched (gathered from every rank) only when it
is written. `safetensors.torch.load_file` reads the result; `TensorFile` reads only the rows asked for.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_tensors(
    out: BinaryIO, tensors: Mapping[str, torch.Tensor], fetch: Callable[[str], torch.Tensor] | None = None
) -> None:
    """Write `tensors` (any device) to `out` in the safetensors layout, in name order.

    The header needs only each tensor's dtype and shape; with `fetch`, the bytes written for a name
    are those of `fetch(name)` (e.g. the whole tensor gathered from a sharded one), called once per name.
    """
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"training state tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        nbytes = t.numel() * t.dtype.itemsize
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    out.write(struct.pack("<Q", len(text)) + text)
    for name in names:
        tensor = fetch(name) if fetch is not None else tensors[name]
        if tensor.dtype != tensors[name].dtype or tensor.shape != tensors[name].shape:
            raise ValueError(f"training state tensor {name!r}: fetched {tensor.dtype} {list(tensor.shape)}, "
                             f"planned {tensors[name].dtype} {list(tensors[name].shape)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        out.write(flat.view(torch.uint8).numpy().data)


class StoredTensor:
    """One tensor of a `TensorFile`, not yet read: `shape`, and `[...]` or `[start:stop]` to read it or rows of it."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self.shape = torch.Size(handle.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._handle[index]


class TensorFile(Mapping[str, StoredTensor]):
    """A safetensors file opened memory-mapped: `file[name][start:stop]` reads only those rows."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.path = os.fspath(path)
        self._file = safe_open(self.path, framework="pt", device="cpu")
        self._names = tuple(self._file.keys())

    def __getitem__(self, name: str) -> StoredTensor:
        if name not in self._names:
            raise KeyError(name)
        return StoredTensor(self._file.get_slice(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
