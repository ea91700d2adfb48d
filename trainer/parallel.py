"""How the model is spread over ranks: the one place that knows DDP (and, later, other strategies)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import ContextManager

import torch

from . import distributed
from .distributed import DistContext


class Parallel:
    """A model placed on this rank's device, wrapped for the job (DDP when there are several ranks).

    `module` is the plain model (parameter names as in the checkpoint); `forward` is what a
    training micro-step calls (DDP and/or torch.compile around it). Methods marked collective
    must be called by every rank.
    """

    def __init__(self, module: torch.nn.Module, ctx: DistContext, compile: bool) -> None:
        self.ctx = ctx
        self.module = module.to(ctx.device)
        self._ddp = None
        target: torch.nn.Module = self.module
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self._ddp = target = DistributedDataParallel(self.module, device_ids=ids)
        self.forward: Callable[..., torch.Tensor] = torch.compile(target) if compile else target

    def accumulate(self, last_micro_step: bool) -> ContextManager[object]:
        """Context for one micro-step's backward: gradients are all-reduced on the last one only."""
        if self._ddp is not None and not last_micro_step:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm` (0 = no clipping); returns the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm if max_norm > 0 else math.inf)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, whole (collective; DDP replicas are whole already)."""
        return dict(self.module.named_parameters())

    def load_full_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy whole tensors into the parameters (collective); every parameter must be given."""
        with torch.no_grad():
            self.module.load_state_dict(dict(tensors), strict=True)

    def replica_digests(self) -> list[str] | None:
        """Every rank's parameter digest, checked equal (collective); None on a single process.

        Raises:
            RuntimeError: the replicas differ (DDP must keep them identical).
        """
        if not self.ctx.enabled:
            return None
        mine = distributed.parameters_sha256(self.module.named_parameters())
        digests = distributed.all_gather_strings(self.ctx, mine)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas hold different weights at the end of training: {digests}")
        return digests


def wrap(model: torch.nn.Module, ctx: DistContext, compile: bool = False) -> Parallel:
    """Place `model` on this rank and wrap it for the job (see `Parallel`)."""
    return Parallel(model, ctx, compile)
