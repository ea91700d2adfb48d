"""Training-state tensors as a safetensors file, streamed one tensor at a time into an open file.

safetensors' own `save_file` needs every tensor on the CPU at once and writes through a temp file
of its own that a killed run would leave behind; here the caller owns the (atomic) file and memory
stays bounded by the largest tensor, which may be fetched (gathered from every rank) only when it
is written. The bytes go through the one safetensors writer (`apr_format.safetensors_writer`);
`safetensors.torch.load_file` reads the result; `TensorFile` reads only the rows asked for, with pread.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import BinaryIO

import torch

from apr_format.constants import DTYPE_BY_TORCH
from apr_format.errors import from_os_error
from apr_format.rows import OpenFile, StoredRows
from apr_format.safetensors_reader import read_header
from apr_format.safetensors_writer import OutTensor, write_safetensors

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
        if known is None or known.safetensors is None:
            raise TypeError(f"training state tensor {name!r} has dtype {t.dtype}, which the state file cannot hold")
        st_dtype = known.safetensors
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


class TensorFile(Mapping[str, StoredRows]):
    """A safetensors file whose tensors are read on demand with pread: `file[name][start:stop]` reads
    only those rows (a file cut short meanwhile is `Truncated`, never SIGBUS).

    Raises (on opening):
        FileMissing, NotAFile, Unreadable: the path cannot be opened.
        CorruptSource, Truncated, UnknownDType: a damaged header.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise from_os_error(self.path, exc) from None
        self._file = OpenFile(fd, self.path)
        entries, _ = read_header(fd, self.path)
        self._tensors = {e.name: StoredRows(self._file, e.start, e.dtype, e.shape) for e in entries}

    def __getitem__(self, name: str) -> StoredRows:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
