"""`TrainState` and the training loop, which only orchestrates: step, validate, record, save."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .checkpoint import Checkpointer
from .config import TrainConfig
from .data import TokenDataset
from .optim import lr_at, set_lr
from .parallel import Parallel
from .precision import Precision
from .runlog import RunLog


@dataclass
class TrainState:
    """What changes from step to step; a checkpoint records it."""

    step: int  # optimizer steps done
    tokens_seen: int
    loss: float | None  # mean training loss of the last step
    val_loss: float | None = None
    val_step: int = -1  # the step val_loss was measured at


class Trainer:
    """One run's training loop over parts built elsewhere (kept out of module globals)."""

    def __init__(self, config: TrainConfig, ctx: distributed.DistContext, dataset: TokenDataset, par: Parallel,
                 optimizer: torch.optim.Optimizer, precision: Precision, checkpointer: Checkpointer, runlog: RunLog,
                 state: TrainState, start_label: str) -> None:
        self.config, self.ctx, self.dataset, self.par, self.optimizer = config, ctx, dataset, par, optimizer
        self.precision, self.checkpointer, self.runlog, self.state = precision, checkpointer, runlog, state
        self.start_label = start_label
        self.local_batch = config.batch_size // ctx.world_size
        self.tokens_per_step = config.batch_size * config.grad_accum * config.seq_len

    def run(self) -> dict[str, Any]:
        """Train to config.steps; returns the summary fields the loop knows."""
        config, state = self.config, self.state
        start_val = state.val_loss = self.evaluate()
        state.val_step = state.step
        self.runlog.start(state.step, start_val, self.start_label)
        last_ckpt = final = None
        while state.step < config.steps:
            record = self.train_step()
            if self._due(config.val_every):
                record["val_loss"] = state.val_loss = self.evaluate()
                state.val_step = state.step
            self.runlog.record(record)
            if self._due(config.save_every):
                last_ckpt = self.checkpointer.save(state, last=state.step == config.steps)
        if last_ckpt is not None:
            final = self.checkpointer.publish_final(last_ckpt)
            self.runlog.log(f"saved {last_ckpt} and {final}")
        return dict(end_step=max(state.step, config.steps), start_val_loss=start_val, final_val_loss=state.val_loss,
                    final_loss=state.loss, tokens_per_s=self.runlog.mean_rate(), checkpoint=_path(last_ckpt),
                    final=_path(final), replica_sha256=self.checkpointer.replicas)

    def _due(self, every: int) -> bool:
        """At the last step, and every `every` steps unless it is 0."""
        step = self.state.step
        return step == self.config.steps or bool(every and step % every == 0)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; this rank takes its share of each."""
        config, ctx, state, device = self.config, self.ctx, self.state, self.ctx.device
        began = time.perf_counter()
        lr = lr_at(state.step, config)
        set_lr(self.optimizer, lr)
        starts = self.dataset.train_starts(config.seed, state.step, config.grad_accum, config.batch_size)
        mine = starts[:, ctx.rank * self.local_batch : (ctx.rank + 1) * self.local_batch]
        loss_sum = torch.zeros((), device=device)
        for micro in range(config.grad_accum):
            window = torch.from_numpy(self.dataset.windows(mine[micro])).to(device, non_blocking=True)
            with self.par.accumulate(last_micro_step=micro == config.grad_accum - 1):
                with self.precision.autocast():
                    loss = self.par.forward(window[:, :-1], window[:, 1:])
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = self.par.clip_grad_norm_(config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total,) = distributed.all_reduce_sum(ctx, [loss_sum.item() / config.grad_accum])
        state.loss = total / ctx.world_size
        state.tokens_seen += self.tokens_per_step
        state.step += 1
        elapsed = time.perf_counter() - began
        return {"step": state.step, "loss": state.loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": self.tokens_per_step / elapsed, "tokens_seen": state.tokens_seen}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation windows (each rank takes every world_size-th)."""
        starts = self.dataset.val_starts(self.config.val_batches * self.config.batch_size)
        mine = starts[self.ctx.rank :: self.ctx.world_size]
        model, total, count = self.par.module, 0.0, 0
        model.eval()
        for begin in range(0, len(mine), self.local_batch):
            window = torch.from_numpy(self.dataset.windows(mine[begin : begin + self.local_batch]))
            window = window.to(self.ctx.device)
            with self.precision.autocast():
                loss = model(window[:, :-1], window[:, 1:])
            tokens = window[:, 1:].numel()
            total += loss.item() * tokens
            count += tokens
        model.train()
        total, count = distributed.all_reduce_sum(self.ctx, [total, float(count)])
        return total / count


def _path(path: Path | None) -> str | None:
    return os.fspath(path) if path is not None else None
