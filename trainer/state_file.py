"""Training-state tensors as a safetensors file, streamed one tensor at a time into an open file.

safetensors' own `save_file` needs every tensor on the CPU at once and writes through a temp file
of its own that a killed run would leave behind; here the caller owns the (atomic) file and memory
stays bounded by the largest tensor. The bytes go through the one safetensors writer
(`apr_format.safetensors_writer`); `safetensors.torch.load_file` reads the result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import BinaryIO

import torch

from apr_format.constants import DTYPE_BY_TORCH
from apr_format.safetensors_writer import OutTensor, write_safetensors

# State dtypes safetensors holds that no APR dtype is (masks, small counters).
_STATE_ONLY = {"bool": "BOOL", "int16": "I16"}


def write_tensors(out: BinaryIO, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `tensors` (any device) to `out` in the safetensors layout.

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
        planned.append(OutTensor(name, st_dtype, tuple(t.shape), t.numel() * t.element_size(), _bytes_of(t)))
    write_safetensors(out, planned, {"format": "pt"})


def _bytes_of(tensor: torch.Tensor):
    def produce() -> memoryview:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        return memoryview(flat.view(torch.uint8).numpy()).cast("B")

    return produce
