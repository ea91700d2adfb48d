"""The run folder and what a run reports: folder claim, metrics.jsonl, run.json, progress lines, the summary."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from apr_format.atomic import claim_folder
from apr_format.errors import OutputExists

from . import checkpoint, distributed
from .distributed import DistContext

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainSummary:
    """What a run did, for the CLI to render."""

    run_dir: str | None
    architecture: dict[str, Any]
    param_count: int
    weights: str  # "loaded N/N tensors from X" or "RANDOM INIT of ..."
    start_step: int
    end_step: int
    start_val_loss: float | None
    final_val_loss: float | None
    final_loss: float | None
    tokens_per_s: float | None
    train_tokens: int
    val_tokens: int
    checkpoint: str | None
    final: str | None
    world_size: int
    replica_sha256: list[str] | None


def refuse_existing_run(run_dir: Path) -> None:
    """A new run never writes into a folder holding another run.

    Raises:
        OutputExists: `run_dir` has metrics or checkpoints.
    """
    if (run_dir / METRICS_FILE).exists() or (run_dir / checkpoint.CHECKPOINT_DIR).exists():
        raise OutputExists(
            run_dir, f"already holds a run ({METRICS_FILE} / {checkpoint.CHECKPOINT_DIR}/); continue it with "
            f"--resume {run_dir}, or choose a new --out",
        )


class RunLog:
    """The run's log lines (main rank, through `log`) and its metrics file (main rank only)."""

    def __init__(self, run_dir: Path, ctx: DistContext, log: Log, steps: int, log_every: int) -> None:
        self.run_dir, self.ctx, self.log, self.steps, self.log_every = run_dir, ctx, log, steps, log_every
        self.rates: list[float] = []
        self._metrics: IO[str] | None = None
        self._lock: int | None = None

    def open(self, start_step: int, config_record: Mapping[str, Any]) -> None:
        """Create the folder, drop metrics logged past the resumed checkpoint, write run.json (collective)."""
        distributed.run_on_main(self.ctx, lambda: self._open(start_step, config_record))

    def _open(self, start_step: int, config_record: Mapping[str, Any]) -> None:
        self._lock = claim_folder(self.run_dir)  # one process per run folder; a second one is told our PID
        if not start_step:  # again, under the lock: a run started beside us may have finished
            refuse_existing_run(self.run_dir)
        (self.run_dir / checkpoint.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if start_step and metrics.exists():  # drop what the interrupted run logged past its checkpoint
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if (record := _record_of(line)) is not None and record.get("step", 0) <= start_step]
            checkpoint.write_text(metrics, "".join(line + "\n" for line in kept))
        checkpoint.write_text(self.run_dir / RUN_FILE, json.dumps(dict(config_record), indent=1) + "\n")
        self._metrics = open(metrics, "a", encoding="utf-8")

    def start(self, step: int, val_loss: float, start_label: str) -> None:
        """The line (and, for a new run, the step-0 record) before any update."""
        if step == 0:
            self.log(f"step 0 (before any update): val_loss {val_loss:.4f} -- {start_label}")
            self._write({"step": 0, "val_loss": val_loss, "tokens_seen": 0})
        else:
            self.log(f"step {step} (resumed): val_loss {val_loss:.4f}")
        if step >= self.steps:
            self.log(f"nothing to train: at step {step} of --steps {self.steps}")

    def record(self, record: dict[str, Any]) -> None:
        """One optimizer step's metrics; a progress line every log_every steps, at the end and with val_loss."""
        self.rates.append(record["tokens_per_s"])
        self._write(record)
        step = record["step"]
        if step % self.log_every == 0 or step == self.steps or "val_loss" in record:
            self.log(progress_line(record, self.steps))

    def mean_rate(self) -> float | None:
        """Mean tokens/s over the run's steps, the first (warm-up) one left out when there are more."""
        if not self.rates:
            return None
        return float(np.mean(self.rates[1:] if len(self.rates) > 1 else self.rates))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()


def progress_line(record: Mapping[str, Any], steps: int) -> str:
    """`step 20/100 | loss 3.2100 | lr 3.00e-04 | grad_norm 0.812 | 12,345 tok/s [| val_loss 3.3000]`."""
    line = (f"step {record['step']}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
    if "val_loss" in record:
        line += f" | val_loss {record['val_loss']:.4f}"
    return line


def _record_of(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl record; None for a blank line or one cut short by a crash or a full disk."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
