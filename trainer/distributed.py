"""torchrun / DistributedDataParallel plumbing: rank detection, device choice, collectives every rank calls."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from apr_format.errors import AprError, InvalidArgument

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. A plain run is rank 0 of a world of 1."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when no process group was created

    @property
    def is_main(self) -> bool:
        """Only the main rank writes files and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.backend is not None


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """`auto` -> cuda when available else cpu; `cuda` fails clearly without CUDA.

    Raises:
        InvalidArgument: unknown device, or cuda asked for where torch sees no GPU.
    """
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request == "cpu":
        return torch.device("cpu")
    if request == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument(
                None, f"cuda asked for but torch {torch.__version__} sees no CUDA GPU (use --device cpu or auto)", flag="--device"
            )
        return torch.device("cuda", local_rank)
    raise InvalidArgument(None, f"unknown device {request!r} (choose auto, cuda or cpu)", flag="--device")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(None, f"environment variable is not an integer: {value!r}", variable=name) from None


def setup(device_request: str) -> DistContext:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (nccl on CUDA, gloo on CPU)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_request, local_rank)
    if world <= 1:
        return DistContext(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device, backend)


def teardown(ctx: DistContext) -> None:
    """Leave the process group (every rank calls it)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, values: Iterable[float]) -> list[float]:
    """Element-wise sum of `values` over all ranks (identity on a single process)."""
    values = list(values)
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def all_gather_strings(ctx: DistContext, value: str) -> list[str]:
    """`value` from every rank, in rank order."""
    if not ctx.enabled:
        return [value]
    out: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return [str(v) for v in out]


def run_on_main(ctx: DistContext, fn: Callable[[], T]) -> T | None:
    """Run `fn` on the main rank only, then let every rank learn whether it failed.

    The collective sits outside the main-only part, so a failing save (disk full) stops
    every rank with an error instead of leaving the others waiting in the next step.
    """
    result, failure = None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks have been told
            failure = exc
    (failed,) = all_reduce_sum(ctx, [1.0 if failure is not None else 0.0])
    if failure is not None:
        raise failure
    if failed:
        raise AprError(None, f"rank {ctx.rank}: stopping because rank 0 failed (see its error)")
    return result


def parameters_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A digest of parameter names and bytes, to check that DDP replicas hold identical weights."""
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def is_main_process() -> bool:
    """Whether this process is rank 0 of its job (torchrun's RANK; a plain run is rank 0), before `setup`."""
    return _env_int("RANK", 0) == 0
