"""How the model is spread over ranks: the one place that knows the strategies (plain, DDP, FSDP)
and activation checkpointing, in the spirit of torchtitan's `parallelize`."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import ContextManager

import torch
from torch.distributed.fsdp import FSDPModule

from . import distributed, sharding
from .distributed import DistContext
from .model import DecoderLM
from .precision import Precision

STRATEGIES = ("auto", "ddp", "fsdp")
# Bytes per parameter DDP keeps on every rank: fp32 weights, gradients and AdamW's two moments.
DDP_BYTES_PER_PARAM = 16
# `auto` picks FSDP under torchrun when DDP's footprint would exceed this share of one device's memory.
AUTO_FSDP_SHARE = 0.5


class Parallel:
    """A model placed on this rank's device, wrapped for the job.

    `module` is the model itself (parameter names as in the checkpoint; under FSDP its parameters
    are this rank's shards, as DTensors); `forward` is what a training micro-step calls (DDP and/or
    torch.compile around it). Methods marked collective must be called by every rank, in the same order.
    """

    strategy = "single"

    def __init__(self, module: DecoderLM, ctx: DistContext, compile: bool, replicate: bool = False) -> None:
        self.ctx = ctx
        self.module = module
        self._ddp = None
        target: torch.nn.Module = module
        if replicate:
            from torch.nn.parallel import DistributedDataParallel

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self._ddp = target = DistributedDataParallel(module, device_ids=ids)
            self.strategy = "ddp"
        self.forward: Callable[..., torch.Tensor] = torch.compile(target) if compile else target

    def accumulate(self, last_micro_step: bool) -> ContextManager[object]:
        """Context for one micro-step's backward: gradients are reduced on the last one only."""
        if self._ddp is not None and not last_micro_step:
            return self._ddp.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[torch.nn.Module]:
        """The model in eval mode for forwards without gradients; back in train mode afterwards."""
        self.module.eval()
        try:
            yield self.module
        finally:
            self.module.train()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to `max_norm` (0 = no clipping); returns the norm before clipping."""
        return sharding.clip_grad_norm_(self.module.parameters(), max_norm if max_norm > 0 else math.inf)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole of a parameter or optimizer-state tensor (collective for a shard)."""
        return sharding.full_tensor(tensor)

    def place(self, param: torch.Tensor, source: sharding.RowSource) -> torch.Tensor:
        """This rank's part of `source` (a whole tensor of `param`'s shape, e.g. an on-demand optimizer
        moment) as a tensor placed like `param`: only the rows this rank holds are read."""
        rows = sharding.read_rows(source, param, param.dtype, self.ctx.device)
        return sharding.like(param, rows)

    def replica_digests(self) -> list[str] | None:
        """Every rank's parameter digest, checked equal (collective); None unless replicated over ranks.

        Raises:
            RuntimeError: the replicas differ (DDP must keep them identical).
        """
        if self._ddp is None:
            return None
        mine = distributed.parameters_sha256(self.module.named_parameters())
        digests = distributed.all_gather_strings(self.ctx, mine)
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas hold different weights at the end of training: {digests}")
        return digests


class Sharded(Parallel):
    """FSDP2: parameters, gradients and optimizer state sharded over ranks (`fully_shard` per layer, then the root)."""

    strategy = "fsdp"

    def __init__(self, module: DecoderLM, ctx: DistContext, compile: bool) -> None:
        self.ctx = ctx
        self.module = module
        self._ddp = None
        self.forward = torch.compile(module) if compile else module

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[torch.nn.Module]:
        """As `Parallel.evaluating`; afterwards every unit is resharded (forwards without a backward
        leave the root's parameters gathered, which the next training step must not find)."""
        with super().evaluating() as module:
            yield module
        for unit in self.module.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()

    def accumulate(self, last_micro_step: bool) -> ContextManager[object]:
        """Reduce-scatter gradients only after the last micro-step's backward."""
        self.module.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()


def choose_strategy(requested: str, ctx: DistContext, param_count: int) -> tuple[str, str]:
    """The strategy to run ("single", "ddp" or "fsdp") and why.

    `auto` trains plainly on one process; under torchrun it picks FSDP when DDP's per-rank
    footprint (16 bytes per parameter) would exceed about half of one device's memory, else DDP.
    `ddp` on one process is plain training; `fsdp` shards even over one rank (same code path).
    """
    if requested == "fsdp":
        return "fsdp", "--strategy fsdp"
    if ctx.world_size == 1:
        return "single", "one process"
    if requested == "ddp":
        return "ddp", "--strategy ddp"
    need, have = DDP_BYTES_PER_PARAM * param_count, device_memory(ctx)
    chosen = "fsdp" if need > AUTO_FSDP_SHARE * have else "ddp"
    return chosen, (f"auto: DDP would keep {need / 2**30:.2f} GiB of weights, gradients and AdamW state per rank, "
                    f"{'over' if chosen == 'fsdp' else 'within'} half of {have / 2**30:.1f} GiB per "
                    f"{ctx.device.type} rank")


def device_memory(ctx: DistContext) -> int:
    """Bytes of memory one rank may use: its GPU's, or on CPU the machine's RAM shared by the ranks on it."""
    if ctx.device.type == "cuda":
        return torch.cuda.get_device_properties(ctx.device).total_memory
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_here)


def wrap(model: DecoderLM, weights: Mapping[str, sharding.RowSource], ctx: DistContext, precision: Precision,
         strategy: str, *, compile: bool = False, activation_checkpointing: bool = False) -> Parallel:
    """Spread the meta-device `model` over the job as `strategy` says ("single", "ddp" or "fsdp"),
    then give it its weights: each rank reads only the rows it holds from `weights` (whole tensors,
    e.g. tensors of an .apr or of the state sidecar read on demand), as fp32 master weights.

    Activation checkpointing recomputes each decoder layer in backward (parameter names unchanged).
    """
    model.checkpoint_layers = activation_checkpointing
    if strategy == "fsdp":
        mesh = sharding.device_mesh(ctx.device, ctx.world_size)
        sharding.shard_decoder(model, mesh, precision.fsdp_policy())
    sharding.load_local(model, weights, ctx.device)
    if strategy == "fsdp":
        return Sharded(model, ctx, compile)
    return Parallel(model, ctx, compile, replicate=strategy == "ddp")
