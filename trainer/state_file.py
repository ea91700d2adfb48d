"""Training-state tensors as a safetensors file, streamed one tensor at a time into an open file.

safetensors' own `save_file` needs every tensor on the CPU at once and writes through a temp file
of its own that a killed run would leave behind; here the caller owns the (atomic) file and memory
stays bounded by the largest tensor, which may be fetched (gathered from every rank) only when it
is written. The bytes go through the one safetensors writer (`apr_format.safetensors_writer`);
`safetensors.torch.load_file` reads the result; `TensorFile` reads only the rows asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import torch

from apr_format.constants import DTYPE_BY_TORCH
from apr_format.safetensors_writer import OutTensor, write_safetensors

# State dtypes safetensors holds that no APR dtype is (masks, small counters).
_STATE_ONLY = {"bool": "BOOL", "int16": "I16"}


def write_tensors(
    out: BinaryIO, tensors: Mapping[str, torch.Tensor], fetch: Callable[[str], torch.Tensor] | None = None
) -> None:
    """Write `tensors` (any device) to `out` in the safetensors layout.

    The header needs only each tensor's dtype and shape; with `fetch`, the bytes written for a name
    are those of `fetch(name)` (e.g. the whole tensor gathered from a sharded one), called once, in
    name order, when that tensor is written.

    Raises:
        TypeError: a dtype safetensors cannot hold (checked before anything is written).
    """
    planned = []
    for name in sorted(tensors):
        t = tensors[name]
        torch_name = str(t.dtype).removeprefix("torch.")
        known = DTYPE_BY_TORCH.get(torch_name)
        st_dtype = known.safetensors if known is not None else _STATE_ONLY.get(torch_name)
        if st_dtype is None:
            raise TypeError(f"training state tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        nbytes = t.numel() * t.dtype.itemsize
        planned.append(OutTensor(name, st_dtype, tuple(t.shape), nbytes, _bytes_of(name, t, fetch)))
    write_safetensors(out, planned, {"format": "pt"})


def _bytes_of(name: str, planned: torch.Tensor, fetch: Callable[[str], torch.Tensor] | None):
    def produce() -> memoryview:
        tensor = fetch(name) if fetch is not None else planned
        if tensor.dtype != planned.dtype or tensor.shape != planned.shape:
            raise ValueError(f"training state tensor {name!r}: fetched {tensor.dtype} {list(tensor.shape)}, "
                             f"planned {planned.dtype} {list(planned.shape)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")

    return produce


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
