"""Numeric precision of a run, in one object: compute dtype (autocast / FSDP policy), fp32 master weights, saved dtype."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch

FLOAT_DTYPES = ("f32", "bf16", "f16")
PRECISIONS = ("auto", "fp32", "bf16-mixed")


@dataclass(frozen=True)
class Precision:
    """How a run computes and saves. Parameters and optimizer state stay fp32 (the master copy);
    forward and backward run under autocast in `compute` (None: plain fp32) on every device type
    (CPU autocast supports bf16, so CPU runs the path CUDA runs); under FSDP the same fields give
    the mixed-precision policy (parameters gathered in `compute`, gradients reduced in fp32).
    Checkpoints store weights as `save` and keep the exact fp32 masters beside them when that rounds.
    """

    name: str  # "fp32" or "bf16-mixed"
    device_type: str
    save: str  # "f32", "bf16" or "f16"

    @classmethod
    def for_run(cls, device: torch.device, requested: str, save_dtype: str, source_dtype: str) -> Precision:
        """`requested` precision ("auto": bf16-mixed where the device computes bf16 natively, i.e. CUDA
        with bf16 support, else fp32); saved as `save_dtype`, or the source file's float dtype on "auto"."""
        if requested == "auto":
            native = device.type == "cuda" and torch.cuda.is_bf16_supported()
            requested = "bf16-mixed" if native else "fp32"
        save = source_dtype if save_dtype == "auto" else save_dtype
        return cls(requested, device.type, save if save in FLOAT_DTYPES else "f32")

    @property
    def compute(self) -> torch.dtype | None:
        """The dtype matmuls run in (None: fp32, no autocast)."""
        return torch.bfloat16 if self.name == "bf16-mixed" else None

    def autocast(self) -> ContextManager[object]:
        """The context forward passes run in (every strategy)."""
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    def fsdp_policy(self):
        """FSDP2's mixed-precision policy: parameters gathered in `compute`, gradients reduced in fp32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)

    @property
    def saves_rounded(self) -> bool:
        """True when the saved weights lose bits, so resuming needs the fp32 masters too."""
        return self.save != "f32"
