"""`TrainConfig`: one run's settings, their validation, and the merge of a resumed run's saved config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from apr_format.errors import InvalidArgument

from . import checkpoint

SAVE_DTYPES = ("auto", "f32", "bf16", "f16")


class OnResume(Enum):
    """What `--resume` does with a setting given again on the command line."""

    FREE = "free"  # may change without effect on the loss curve (logging, device, where files go)
    WARN = "warn"  # may change, with a warning: the curve then differs from an uninterrupted run
    FIXED = "fixed"  # taken from the checkpoint; giving it is an error


def _setting(default: Any = None, *, on_resume: OnResume = OnResume.FREE, path: bool = False) -> Any:
    """A config field with its resume rule and whether it is a path (saved absolute)."""
    return dataclasses.field(default=default, metadata={"on_resume": on_resume, "path": path})


_WARN, _FIXED = OnResume.WARN, OnResume.FIXED


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs. `batch_size` is the global micro-batch (all ranks together):
    an optimizer step sees batch_size * grad_accum sequences of seq_len tokens whatever the
    number of processes, so the same command gives the same run under torchrun."""

    data: str = dataclasses.field(metadata={"on_resume": _WARN, "path": True})
    out_dir: str | None = _setting(path=True)  # default on --resume: the resumed run's folder
    init: str | None = _setting(on_resume=_FIXED, path=True)  # weights only: fresh optimizer, step 0
    resume: str | None = _setting(path=True)  # a run folder or checkpoints/step-*.apr: restore everything
    arch: str | None = _setting(on_resume=_FIXED)  # preset name for random init (default llama-370m)
    arch_config: str | None = _setting(on_resume=_FIXED, path=True)  # JSON architecture file for random init
    tokenizer: str | None = _setting(path=True)  # tokenizer.json (else the one inside the --init .apr)
    steps: int = _setting(1000, on_resume=_WARN)
    batch_size: int = _setting(8, on_resume=_WARN)
    seq_len: int = _setting(512, on_resume=_WARN)
    lr: float = _setting(3e-4, on_resume=_WARN)
    min_lr_ratio: float = _setting(0.1, on_resume=_WARN)  # cosine decays to lr * min_lr_ratio
    warmup: int = _setting(100, on_resume=_WARN)
    grad_accum: int = _setting(1, on_resume=_WARN)
    grad_clip: float = _setting(1.0, on_resume=_WARN)  # 0 disables clipping (the norm is still logged)
    weight_decay: float = _setting(0.1, on_resume=_WARN)  # on matrices only; norms and biases get none
    beta1: float = _setting(0.9, on_resume=_WARN)
    beta2: float = _setting(0.95, on_resume=_WARN)
    device: str = _setting("auto")
    compile: bool = _setting(False)
    val_every: int = _setting(100)  # 0: only at the start and the end
    val_batches: int = _setting(8)  # validation uses up to val_batches * batch_size fixed windows
    val_fraction: float = _setting(0.05, on_resume=_WARN)
    save_every: int = _setting(500)  # 0: only at the end
    seed: int = _setting(0, on_resume=_WARN)
    dtype: str = _setting("auto")  # of the saved weights: auto = the --init file's (f32 for random init)
    log_every: int = _setting(10)
    check_only: bool = _setting(False)  # load and check everything, then stop before the first step


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _names(rule: OnResume) -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["on_resume"] is rule]


def validate_config(config: TrainConfig) -> None:
    """Reject contradictory or out-of-range settings before anything is loaded.

    Raises:
        InvalidArgument: naming the flag.
    """
    if config.init and (config.arch or config.arch_config):
        raise InvalidArgument(
            None, "conflicts with --arch/--arch-config: the architecture comes from the checkpoint", flag="--init"
        )
    if config.arch and config.arch_config:
        raise InvalidArgument(None, "conflicts with --arch-config: give one architecture", flag="--arch")
    if config.out_dir is None and not config.resume:
        raise InvalidArgument(None, "is required (the run folder)", flag="--out")
    positive = {"--batch-size": config.batch_size, "--seq-len": config.seq_len, "--grad-accum": config.grad_accum,
                "--val-batches": config.val_batches, "--log-every": config.log_every}
    non_negative = {"--steps": config.steps, "--warmup": config.warmup, "--val-every": config.val_every,
                    "--save-every": config.save_every, "--grad-clip": config.grad_clip,
                    "--weight-decay": config.weight_decay}
    for flag, value in positive.items():
        if value < 1:
            raise InvalidArgument(None, f"must be at least 1, got {value}", flag=flag)
    for flag, value in non_negative.items():
        if value < 0:
            raise InvalidArgument(None, f"must be >= 0, got {value}", flag=flag)
    if not config.lr > 0:
        raise InvalidArgument(None, f"must be > 0, got {config.lr}", flag="--lr")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise InvalidArgument(None, f"must be in [0, 1], got {config.min_lr_ratio}", flag="--min-lr-ratio")
    if config.dtype not in SAVE_DTYPES:
        raise InvalidArgument(None, f"unknown {config.dtype!r} (choose {', '.join(SAVE_DTYPES)})", flag="--dtype")


def resume_config(resume: str | os.PathLike, overrides: Mapping[str, Any]) -> TrainConfig:
    """The config of the run being resumed (read from its `.state.json` only), with `overrides`
    (flags given on the command line).

    Raises:
        InvalidArgument: an override of a setting fixed on resume, or an unknown setting.
        Plus `checkpoint.load_scalars`'s errors.
    """
    ckpt = checkpoint.resolve_resume(resume)
    saved = dict(checkpoint.load_scalars(ckpt).get("config") or {})
    for key in _names(OnResume.FIXED):
        if overrides.get(key) is not None:
            raise InvalidArgument(
                _flag(key), "cannot be combined with --resume: a resumed run keeps its weights and architecture"
            )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidArgument(None, f"unknown training setting(s): {', '.join(unknown)}")
    values = {k: v for k, v in saved.items() if k in known}
    values.update(overrides)
    values["resume"] = os.fspath(resume)
    if overrides.get("out_dir") is None:
        values["out_dir"] = os.fspath(checkpoint.run_dir_of(ckpt))
    return TrainConfig(**values)


def resume_drift(scalars: Mapping[str, Any], config: TrainConfig, num_tokens: int) -> list[str]:
    """Warnings for settings changed since the checkpoint: the curve then differs from an uninterrupted run."""
    if not scalars:
        return []
    saved = scalars.get("config") or {}
    now = config_record(config)
    out = [f"warning: {_flag(key)} changed from {saved[key]} to {now[key]} since the checkpoint"
           for key in _names(OnResume.WARN) if key in saved and saved[key] != now[key]]
    before = (scalars.get("data") or {}).get("num_tokens")
    if before is not None and before != num_tokens:
        out.append(f"warning: the data held {before:,} tokens at the checkpoint and now {num_tokens:,}: "
                   "the resumed run will not see the same batches")
    return out


def config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as saved with a run: paths made absolute so a resume works from any folder."""
    record = dataclasses.asdict(config)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata["path"] and record[f.name] is not None:
            record[f.name] = os.path.abspath(record[f.name])
    return record
