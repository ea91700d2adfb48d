"""The run folder and what a run reports: folder claim, metrics.jsonl, run.json, progress lines, the summary."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from apr_format.atomic import claim_folder
from apr_format.errors import InvalidArgument, OutputExists

from . import checkpoint, distributed
from .distributed import DistContext

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard's event files (--tensorboard), beside metrics.jsonl
TENSORBOARD_KEYS = ("loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps")

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
    strategy: str | None  # "single", "ddp" or "fsdp" (None: --check-only)
    precision: str | None  # "fp32" or "bf16-mixed"
    peak_memory_bytes: list[int] | None  # per rank: CUDA max allocated, else peak RSS
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm
    stopped_by: str | None = None  # "SIGTERM" etc. when a signal stopped the run before --steps


def check_run_dir(run_dir: Path, *, resuming: bool, force: bool) -> None:
    """Before anything is loaded: --out must be (or can become) a writable folder, and a new run
    replaces a run that can be continued only with --force.

    A folder whose run stopped before its first complete checkpoint (or with --steps 0) holds
    nothing to continue: a new run reuses it.

    Raises:
        InvalidArgument: --out is a file, or cannot be written.
        OutputExists: it holds a run with a complete checkpoint or final.apr (and no --force).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise InvalidArgument(run_dir, "is a file, not a run folder: choose another --out")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidArgument(run_dir, f"cannot be written ({existing} is read-only): choose another --out")
    if resuming or force:
        return
    if checkpoint.complete_checkpoints(run_dir) or (run_dir / checkpoint.FINAL_NAME).exists():
        raise OutputExists(
            run_dir, f"already holds a run with a complete checkpoint; continue it with --resume {run_dir}, "
            "replace it with --force, or choose a new --out",
        )


def require_tensorboard() -> None:
    """Raises InvalidArgument (--tensorboard) with the install command when tensorboard is absent."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise InvalidArgument(
            None, "needs the tensorboard package: pip install 'apr-toolkit[tensorboard]'", flag="--tensorboard"
        ) from None


def clear_run(run_dir: Path) -> list[str]:
    """Remove the files an earlier run left in `run_dir` (ours only); returns their names relative to it."""
    ckpt_dir = run_dir / checkpoint.CHECKPOINT_DIR
    owned = [run_dir / METRICS_FILE, run_dir / RUN_FILE, run_dir / checkpoint.FINAL_NAME]
    owned += sorted(run_dir.glob(EVENTS_GLOB)) if run_dir.is_dir() else []
    owned += sorted(ckpt_dir.glob("step-*")) if ckpt_dir.is_dir() else []
    removed = []
    for path in owned:
        if path.is_file():
            path.unlink()
            removed.append(os.path.relpath(path, run_dir))
    return removed


class RunLog:
    """The run's log lines (main rank, through `log`) and its metrics file (main rank only)."""

    def __init__(self, run_dir: Path, ctx: DistContext, log: Log, steps: int, log_every: int,
                 keep_last: int | None = None, tensorboard: bool = False, force: bool = False) -> None:
        self.run_dir, self.ctx, self.log, self.steps, self.log_every = run_dir, ctx, log, steps, log_every
        self.keep_last, self.tensorboard, self.force = keep_last, tensorboard, force
        self.rates: list[float] = []
        self._metrics: IO[str] | None = None
        self._events: Any = None  # torch.utils.tensorboard.SummaryWriter (main rank, --tensorboard)
        self._began = time.monotonic()
        self._first_step: int | None = None
        self._lock: int | None = None

    def open(self, start_step: int, config_record: Mapping[str, Any]) -> None:
        """Create the folder, drop metrics logged past the resumed checkpoint, write run.json (collective)."""
        distributed.run_on_main(self.ctx, lambda: self._open(start_step, config_record))

    def _open(self, start_step: int, config_record: Mapping[str, Any]) -> None:
        self._lock = claim_folder(self.run_dir)  # one process per run folder; a second one is told our PID
        if not start_step:  # a new run: check again under the lock (a run beside us may have saved
            check_run_dir(self.run_dir, resuming=False, force=self.force)  # meanwhile), then clear
            removed = clear_run(self.run_dir)
            if removed:
                self.log(f"{self.run_dir}: replacing the earlier run's files ({', '.join(removed)})")
        (self.run_dir / checkpoint.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if start_step and metrics.exists():  # drop what the interrupted run logged past its checkpoint
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if (record := _record_of(line)) is not None and record.get("step", 0) <= start_step]
            checkpoint.write_text(metrics, "".join(line + "\n" for line in kept))
        checkpoint.write_text(self.run_dir / RUN_FILE, json.dumps(dict(config_record), indent=1) + "\n")
        self._metrics = open(metrics, "a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run: TensorBoard drops what the interrupted run logged after the checkpoint.
            self._events = SummaryWriter(log_dir=os.fspath(self.run_dir), purge_step=start_step + 1 if start_step else None)

    def start(self, step: int, val_loss: float, start_label: str) -> None:
        """The line (and, for a new run, the step-0 record) before any update; the clock starts here."""
        self._began, self._first_step = time.monotonic(), step
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
        if step % self.log_every == 0 or step == self.steps or "val_loss" in record or record.get("skipped"):
            self.log(progress_line(record, self.steps, *self._clock(step)))

    def saved(self, path: Path, last: bool) -> None:
        """Drop the checkpoints past --keep-last (main rank; final.apr is never touched) and say so; an
        intermediate checkpoint gets its own line (the last one is announced with final.apr)."""
        removed = distributed.run_on_main(self.ctx, lambda: prune_checkpoints(self.run_dir, self.keep_last))
        dropped = f"removed {', '.join(p.name for p in removed)} (--keep-last {self.keep_last})" if removed else ""
        if not last:
            self.log(f"saved {path}" + (f"; {dropped}" if dropped else ""))
        elif dropped:
            self.log(dropped)

    def _clock(self, step: int) -> tuple[float, float | None]:
        """Seconds since the first step, and the estimated seconds left (None before a step is done)."""
        elapsed = time.monotonic() - self._began
        done = step - (self._first_step or 0)
        return elapsed, (elapsed / done * (self.steps - step) if done > 0 else None)

    def mean_rate(self) -> float | None:
        """Mean tokens/s over the run's steps, the first (warm-up) one left out when there are more."""
        if not self.rates:
            return None
        return float(np.mean(self.rates[1:] if len(self.rates) > 1 else self.rates))

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
            self._metrics.flush()
        if self._events is not None:
            for key in TENSORBOARD_KEYS:
                value = record.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._events.add_scalar(key, value, record["step"])
            self._events.flush()


def strict_json(record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` with each NaN/Inf value written as null beside `<key>_nonfinite` ("nan", "inf", "-inf"):
    metrics.jsonl stays JSON that jq and pandas read."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key], out[f"{key}_nonfinite"] = None, str(value)
        else:
            out[key] = value
    return out


def prune_checkpoints(run_dir: Path, keep_last: int | None) -> list[Path]:
    """Delete the complete checkpoints older than the newest `keep_last` (None: keep all); the
    commit marker (.state.json) goes first, so a crash midway never leaves a half checkpoint that looks whole."""
    if keep_last is None:
        return []
    old = [path for _, path in checkpoint.complete_checkpoints(run_dir)[:-keep_last]]
    for path in old:
        for part in (*checkpoint.state_paths(path), path):
            part.unlink(missing_ok=True)
    return old


def progress_line(record: Mapping[str, Any], steps: int, elapsed: float | None = None,
                  eta: float | None = None) -> str:
    """`step 20/100 | loss 3.2100 | lr 3.00e-04 | grad_norm 0.812 | 12,345 tok/s [| val_loss 3.3000]
    [| SKIPPED (non-finite)] | elapsed 1m05s | eta 4m20s`."""
    line = (f"step {record['step']}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"grad_norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
    if "val_loss" in record:
        line += f" | val_loss {record['val_loss']:.4f}"
    if record.get("skipped"):
        line += f" | SKIPPED (non-finite loss or gradient norm; {record['skipped_steps']} so far)"
    if elapsed is not None:
        line += f" | elapsed {duration(elapsed)}"
    if eta is not None:
        line += f" | eta {duration(eta)}"
    return line


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `2h07m`."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _record_of(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl record; None for a blank line or one cut short by a crash or a full disk."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
