"""Numeric precision of a run, in one object: compute dtype (autocast), fp32 master weights, saved dtype."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

FLOAT_DTYPES = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class Precision:
    """How a run computes and saves. Parameters and optimizer state stay fp32 (the master copy);
    forward and backward run under autocast in `compute` (None: plain fp32); checkpoints store
    weights as `save` and keep the exact fp32 masters beside them when that rounds.

    Plain and DDP runs use `autocast()`. An FSDP strategy gets its mixed-precision policy
    (param dtype = `compute`, reduce dtype fp32) from these same fields, here.
    """

    compute: torch.dtype | None
    save: str  # "f32", "bf16" or "f16"

    @classmethod
    def for_run(cls, device: torch.device, requested: str, source_dtype: str) -> Precision:
        """bf16 autocast on CUDA, fp32 on CPU; saved as `requested`, or as the source file's float dtype on "auto"."""
        compute = torch.bfloat16 if device.type == "cuda" else None
        save = source_dtype if requested == "auto" else requested
        return cls(compute, save if save in FLOAT_DTYPES else "f32")

    def autocast(self) -> ContextManager[object]:
        """The context forward passes run in (plain and DDP strategies)."""
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.compute)

    @property
    def saves_rounded(self) -> bool:
        """True when the saved weights lose bits, so resuming needs the fp32 masters too."""
        return self.save != "f32"
