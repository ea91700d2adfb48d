"""Tensors read on demand with pread, rows at a time: a training rank reads only the rows it keeps
(so no rank holds a whole model it shards), and a file cut short meanwhile is a `Truncated` error
naming it, never a death by SIGBUS as through a memory map. Imports torch when a tensor is built."""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

from .constants import DTYPE_BY_NAME
from .sourceio import read_exact


class OpenFile:
    """A read-only descriptor of one file, closed once nothing uses this object any more."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        weakref.finalize(self, os.close, fd)


class StoredRows:
    """One plain tensor (stored as-is: neither quantized nor compressed) at byte `offset` of `file`, not
    yet read. `shape` and `dtype` (torch's) describe it; `[start:stop]` reads those rows (first
    dimension) and `[...]` all of it, each time as a new CPU tensor owning its memory.

    Raises (on reading):
        Truncated: the file ends before the bytes asked for (it was cut short by another program).
    """

    def __init__(self, file: OpenFile, offset: int, dtype: str, shape: tuple[int, ...]) -> None:
        import torch

        self._file, self._offset = file, offset
        self.dtype = getattr(torch, DTYPE_BY_NAME[dtype].torch)
        self.shape = torch.Size(shape)

    def __getitem__(self, index: Any):
        import torch

        if index is Ellipsis:
            start, stop, rows = 0, 1, (1, *self.shape)
        elif isinstance(index, slice) and self.shape and index.step in (None, 1):
            start, stop, _ = index.indices(self.shape[0])
            stop = max(start, stop)
            rows = (stop - start, *self.shape[1:])
        else:
            raise TypeError(f"StoredRows takes [...] or [start:stop], not [{index!r}]")
        row_bytes = math.prod(rows[1:]) * self.dtype.itemsize
        shape = self.shape if index is Ellipsis else torch.Size(rows)
        if not row_bytes or start == stop:
            return torch.empty(shape, dtype=self.dtype)
        data = read_exact(self._file.fd, self._offset + start * row_bytes, (stop - start) * row_bytes, self._file.path)
        return torch.frombuffer(data, dtype=self.dtype).reshape(shape)

    def __repr__(self) -> str:
        return f"StoredRows({self._file.path!r}, {self.dtype}, {list(self.shape)})"
