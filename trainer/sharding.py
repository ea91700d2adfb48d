"""FSDP2 for `DecoderLM`: per-layer `fully_shard` on a meta-built model, each rank's rows copied from
full (on-demand) tensors, sharded-gradient clipping, and full tensors gathered one at a time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from .model import DecoderLM

# Anything whose `[start:stop]` gives those rows as a torch.Tensor: a tensor, or a tensor of a file
# read on demand (`apr_format.rows.StoredRows`: an .apr loaded with on_demand, the state sidecar).
RowSource = Any


def device_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """The 1-D mesh of every rank, on `device`'s type (gloo on CPU, nccl on CUDA)."""
    return init_device_mesh(device.type, (world_size,))


def shard_decoder(model: DecoderLM, mesh: DeviceMesh, policy: MixedPrecisionPolicy | None = None) -> DecoderLM:
    """`fully_shard` each decoder layer, then the root: the embedding, the final norm and the head
    (the embedding itself when tied) form the root unit, so a tied head is never split from it."""
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    fully_shard(model, mesh=mesh, mp_policy=policy or MixedPrecisionPolicy())
    return model


def shard_rows(param: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of the full tensor that this rank holds (all of them when not sharded).

    FSDP2 shards dim 0 as `torch.chunk` does: ceil(rows / world) per rank, the last ranks maybe fewer or none.
    """
    rows = param.shape[0]
    if not isinstance(param, DTensor):
        return 0, rows
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a dim-0 sharded parameter, got placements {param.placements}")
    mesh = param.device_mesh
    size = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * size, rows)
    stop = min(start + size, rows)
    if param.to_local().shape[0] != stop - start:
        raise ValueError(f"local shard holds {param.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


def local_part(param: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores for `param` (its shard, or the whole tensor)."""
    return param.to_local() if isinstance(param, DTensor) else param


def like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """`local` (this rank's rows) as a tensor shaped and placed like `param` (a DTensor when it is one)."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(),
                              run_check=False)


def read_rows(source: RowSource, param: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This rank's rows of `source` (a full tensor or safetensors slice) as `dtype` on `device`."""
    start, stop = shard_rows(param)
    rows = source[start:stop]
    return rows.to(device=device, dtype=dtype)


@torch.no_grad()
def load_local(model: torch.nn.Module, tensors: Mapping[str, RowSource], device: torch.device) -> None:
    """Allocate a (sharded) meta model on `device` and fill each parameter with its own rows of `tensors`.

    Only this rank's rows are read: with on-demand sources no rank holds a full copy of the model.
    """
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        local = local_part(param)
        local.copy_(read_rows(tensors[name], param, local.dtype, device))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather for a DTensor: every rank must call it, in the same order)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to `max_norm` by their global L2 norm, which is returned.

    Sharded gradients yield a partial norm per rank; it is reduced over all ranks before scaling,
    so every rank clips with the norm of the whole model (torchtitan's approach).
    """
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
