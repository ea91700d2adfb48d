"""`TrainState` and the training loop, which only orchestrates: step, validate, record, save."""

from __future__ import annotations

import math
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
from .guards import NonFiniteGuard, SaveAborted, StopSignal, is_finite
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
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient norm


@dataclass(frozen=True)
class StepResult:
    """One optimizer step as the loop sees it: its metrics record and the flags every rank agreed on."""

    record: dict[str, Any]
    finite: bool  # False: the update was skipped on every rank
    stop: bool  # a rank was asked to stop (signal): save and leave after this step


class Trainer:
    """One run's training loop over parts built elsewhere (kept out of module globals)."""

    def __init__(self, config: TrainConfig, ctx: distributed.DistContext, dataset: TokenDataset, par: Parallel,
                 optimizer: torch.optim.Optimizer, precision: Precision, checkpointer: Checkpointer, runlog: RunLog,
                 state: TrainState, start_label: str, stop: StopSignal, guard: NonFiniteGuard,
                 resumed_from: Path | None) -> None:
        self.config, self.ctx, self.dataset, self.par, self.optimizer = config, ctx, dataset, par, optimizer
        self.precision, self.checkpointer, self.runlog, self.state = precision, checkpointer, runlog, state
        self.start_label, self.stop, self.guard = start_label, stop, guard
        self.last_checkpoint = self.resumed_from = resumed_from
        self.local_batch = config.batch_size // ctx.world_size
        self.tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
        self.peak_memory: list[int] = []  # bytes, per rank, as of the last step

    def run(self) -> dict[str, Any]:
        """Train to config.steps, or until a signal asks to stop; returns the summary fields the loop knows."""
        config, state = self.config, self.state
        start_val = self.evaluate()
        state.val_loss, state.val_step = _finite_or_none(start_val), state.step
        self.runlog.start(state.step, start_val, self.start_label)
        stop = self.stop.agreed(self.ctx)  # asked during loading: no step done, nothing to save
        while state.step < config.steps and not stop:
            result = self.train_step()
            stop = result.stop and state.step < config.steps  # at the last step the run simply ends
            if self._due(config.val_every):
                val = result.record["val_loss"] = self.evaluate()
                state.val_loss, state.val_step = _finite_or_none(val), state.step
            self.runlog.record(result.record)
            self.guard.check(state.step, result.finite, _path(self.last_checkpoint))
            if self._due(config.save_every) or stop:
                self.save()
        final = None
        saved_here = self.last_checkpoint not in (None, self.resumed_from)
        if saved_here and not stop and state.step == config.steps:
            final = self.checkpointer.publish_final(self.last_checkpoint)
            self.runlog.log(f"saved {self.last_checkpoint} and {final}")
        return dict(end_step=state.step, start_val_loss=_finite_or_none(start_val), final_val_loss=state.val_loss,
                    final_loss=state.loss, tokens_per_s=self.runlog.mean_rate(),
                    checkpoint=_path(self.last_checkpoint), final=_path(final),
                    replica_sha256=self.checkpointer.replicas, tokens_seen=state.tokens_seen,
                    skipped_steps=state.skipped_steps, stopped_by=self.stop.name if stop else None,
                    peak_memory_bytes=self._peak_memory())

    def save(self) -> None:
        """Write this step's checkpoint (collective); a signal during the write aborts it (SaveAborted)."""
        state, previous = self.state, self.last_checkpoint
        try:
            with self.stop.saving():
                path = self.checkpointer.save(state, last=state.step == self.config.steps)
        except SaveAborted as abort:
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            abort.message = (f"aborted by a second signal while writing the checkpoint of step {state.step}; "
                             f"{kept}")
            raise
        self.last_checkpoint = path
        self.runlog.saved(path, last=state.step == self.config.steps)

    def _peak_memory(self) -> list[int]:
        """Every rank's peak memory so far, in rank order (collective)."""
        mine = distributed.one_hot(self.ctx, distributed.peak_memory(self.ctx.device))
        return [int(v) for v in distributed.all_reduce_sum(self.ctx, mine)]

    def _due(self, every: int) -> bool:
        """At the last step, and every `every` steps unless it is 0."""
        step = self.state.step
        return step == self.config.steps or bool(every and step % every == 0)

    def train_step(self) -> StepResult:
        """One optimizer step over grad_accum micro-batches; this rank takes its share of each.

        The ranks agree (one all-reduce) on the mean loss, on whether the loss and gradient norm are
        finite everywhere and on whether any rank was asked to stop, before the update: a non-finite
        step leaves weights and optimizer moments untouched on every rank alike.
        """
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
                    loss = self.guard.poison(state.step + 1, self.par.forward(window[:, :-1], window[:, 1:]), ctx)
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        grad_norm = float(self.par.clip_grad_norm_(config.grad_clip))
        local_loss = loss_sum.item() / config.grad_accum
        total, nonfinite, asked, *peaks = distributed.all_reduce_sum(
            ctx, [local_loss, 0.0 if is_finite(local_loss, grad_norm) else 1.0, self.stop.local_flag,
                  *distributed.one_hot(ctx, distributed.peak_memory(device))])
        finite = nonfinite == 0
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = total / ctx.world_size
        state.loss = loss if finite else None
        state.skipped_steps += 0 if finite else 1
        self.peak_memory = [int(p) for p in peaks]
        state.tokens_seen += self.tokens_per_step
        state.step += 1
        elapsed = time.perf_counter() - began
        record = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": self.tokens_per_step / elapsed, "tokens_seen": state.tokens_seen,
                  "skipped_steps": state.skipped_steps, "strategy": self.par.strategy,
                  "precision": self.precision.name, "world_size": ctx.world_size,
                  "peak_memory_mib": [round(p / 2**20, 1) for p in self.peak_memory]}
        if not finite:
            record["skipped"] = True
        return StepResult(record, finite, asked > 0)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation windows (each rank takes every world_size-th)."""
        starts = self.dataset.val_starts(self.config.val_batches * self.config.batch_size)
        mine = starts[self.ctx.rank :: self.ctx.world_size]
        total, count = 0.0, 0
        # Every rank runs as many forwards as the rank with the most windows (a sharded model's forward
        # is collective); a rank out of windows repeats its last one and does not count it.
        most = -(-len(starts) // self.ctx.world_size)
        with self.par.evaluating() as model:
            for begin in range(0, most, self.local_batch):
                chunk = mine[begin : begin + self.local_batch]
                window = torch.from_numpy(self.dataset.windows(chunk if len(chunk) else mine[-1:]))
                window = window.to(self.ctx.device)
                with self.precision.autocast():
                    loss = model(window[:, :-1], window[:, 1:])
                tokens = window[:, 1:].numel() if len(chunk) else 0
                total += loss.item() * tokens
                count += tokens
        total, count = distributed.all_reduce_sum(self.ctx, [total, float(count)])
        return total / count


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _path(path: Path | None) -> str | None:
    return os.fspath(path) if path is not None else None
