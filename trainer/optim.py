"""The optimizer and its schedule: AdamW parameter groups, `lr_at` (linear warmup + cosine), the saved schedule."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

SCHEDULE = "linear-warmup-cosine"
WARMUP_CAP = 0.1  # a --warmup that would not end before the last step is cut to this share of --steps


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices only; norms and biases (ndim < 2) get none."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters, fused (one kernel for all parameters) where torch has it: CUDA and CPU."""
    fused = True if device.type in ("cuda", "cpu") else None
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.beta1, config.beta2), eps=1e-8, fused=fused)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def schedule_record(config: TrainConfig, next_step: int) -> dict[str, Any]:
    """The schedule as saved in a checkpoint's training state."""
    return {"kind": SCHEDULE, "lr": config.lr, "warmup": config.warmup, "steps": config.steps,
            "min_lr_ratio": config.min_lr_ratio, "next_lr": lr_at(next_step, config)}


def capped_warmup(config: TrainConfig) -> tuple[TrainConfig, str | None]:
    """`config` with a warmup that ends before the last step (else the peak lr is never reached),
    and the warning that says so (None when nothing changed)."""
    if config.steps == 0 or config.warmup <= config.steps:  # equal: the peak comes at the last step
        return config, None
    warmup = int(config.steps * WARMUP_CAP)
    note = (f"warning: --warmup {config.warmup} would not end within --steps {config.steps}, so the peak --lr "
            f"{config.lr:g} would never be reached: warming up over {warmup} steps ({WARMUP_CAP:.0%} of the run)")
    return dataclasses.replace(config, warmup=warmup), note
