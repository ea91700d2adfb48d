"""The optimizer and its schedule: AdamW parameter groups, `lr_at` (linear warmup + cosine), the saved schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TrainConfig

SCHEDULE = "linear-warmup-cosine"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices only; norms and biases (ndim < 2) get none."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `model`'s parameters (fused on CUDA)."""
    fused = True if device.type == "cuda" else None
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
