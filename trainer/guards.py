"""What stops or shields a run: `StopSignal` (preemption signals), `NonFiniteGuard` (NaN/Inf steps), the finite-weights check."""

from __future__ import annotations

import math
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import torch

from apr_format.errors import AprError

from . import distributed
from .distributed import DistContext

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # SIGUSR1: what SLURM sends with --signal
POISON_ENV = "APR_TEST_POISON_STEPS"  # TEST ONLY: comma-separated steps whose loss rank 0 turns into NaN


class SaveAborted(BaseException):
    """A second signal arrived while the stop checkpoint was being written (BaseException: nothing may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.message = f"aborted by a second {signal.Signals(signum).name}"


class TooManySkippedSteps(AprError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient norm."""


class NonFiniteWeights(AprError):
    """A checkpoint was about to hold a NaN or Inf weight; it is not written."""


class StopSignal:
    """SIGTERM, SIGINT and SIGUSR1 ask the run to stop after the current optimizer step.

    The handlers only set a flag. A further signal before the stop checkpoint is being written
    is absorbed (torchrun forwards the signal that every process of the group also received);
    one during that write aborts it at once (`SaveAborted`), leaving the previous checkpoint intact.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saving = False
        self._previous: dict[int, Any] = {}

    @contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Install the handlers, restore the previous ones on exit (Python lets only the main thread
        install them: elsewhere, e.g. a library caller's worker thread, signals keep their usual effect)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous.clear()

    @contextmanager
    def saving(self) -> Iterator[None]:
        """While inside, a signal (after the first) aborts the write in progress."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def agreed(self, ctx: DistContext) -> bool:
        """Whether any rank was asked to stop (collective)."""
        (asked,) = distributed.all_reduce_sum(ctx, [self.local_flag])
        return asked > 0

    @property
    def local_flag(self) -> float:
        return 1.0 if self.signum is not None else 0.0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        elif self._saving:
            raise SaveAborted(signum)


class NonFiniteGuard:
    """Counts consecutive steps skipped for a non-finite loss or gradient norm; too many in a row stop the run."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.poisoned = poisoned_steps()

    def check(self, step: int, finite: bool, last_checkpoint: str | None) -> None:
        """Count step `step`; raises TooManySkippedSteps after max_consecutive skips in a row."""
        if finite:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            kept = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                    else "no checkpoint was written")
            raise TooManySkippedSteps(
                None,
                f"{self.consecutive} consecutive steps (up to step {step}) had a non-finite loss or gradient norm "
                f"and were skipped; stopping ({kept}; try a lower --lr)", flag="--max-skipped-steps",
            )

    def poison(self, step: int, loss: torch.Tensor, ctx: DistContext) -> torch.Tensor:
        """TEST ONLY (APR_TEST_POISON_STEPS): rank 0's loss of 1-based step `step` becomes NaN."""
        if step in self.poisoned and ctx.is_main:
            return loss * float("nan")
        return loss


def poisoned_steps() -> frozenset[int]:
    """The steps named by the test-only APR_TEST_POISON_STEPS variable (empty when unset)."""
    text = os.environ.get(POISON_ENV, "").strip()
    try:
        return frozenset(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise AprError(None, f"test-only variable must list step numbers, got {text!r}", variable=POISON_ENV) from None


def is_finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def refuse_nonfinite(ctx: DistContext, named: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype,
                     path: os.PathLike | str) -> None:
    """Refuse to write checkpoint `path` when any rank's weights hold NaN or Inf once cast to the saved
    `dtype` (a finite fp32 weight past f16's range is Inf in an f16 file) (collective).

    Raises:
        NonFiniteWeights: naming the first such tensor (on the rank that has it).
    """
    bad = None
    with torch.no_grad():
        for name, tensor in named:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if not bool(torch.isfinite(local.to(dtype)).all()):
                bad = name
                break
    (count,) = distributed.all_reduce_sum(ctx, [1.0 if bad is not None else 0.0])
    if count:
        what = f"weight {bad!r}" if bad is not None else "a weight held by another rank"
        raise NonFiniteWeights(path, f"not written: {what} holds NaN or Inf as {str(dtype).removeprefix('torch.')} "
                                     "(the previous checkpoint is kept)")
