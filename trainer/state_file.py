"""Training-state tensors as a safetensors file, streamed one tensor at a time into an open file.

safetensors' own `save_file` needs every tensor on the CPU at once and writes through a temp file
of its own that a killed run would leave behind; here the caller owns the (atomic) file and memory
stays bounded by the largest tensor. `safetensors.torch.load_file` reads the result.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import BinaryIO

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_tensors(out: BinaryIO, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `tensors` (any device) to `out` in the safetensors layout, in name order."""
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"training state tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    out.write(struct.pack("<Q", len(text)) + text)
    for name in names:
        flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        out.write(flat.view(torch.uint8).numpy().data)
