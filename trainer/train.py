"""`train()`: build a run's parts (inputs, model, wrapping, optimizer, checkpointer, log), train, close."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from apr_format.errors import InvalidArgument

from . import checkpoint, distributed, inputs, parallel
from .config import TrainConfig, config_record, resume_drift, validate_config
from .distributed import DistContext
from .loop import Trainer, TrainState
from .optim import build_optimizer
from .precision import Precision
from .runlog import RunLog, TrainSummary, refuse_existing_run

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def train(config: TrainConfig, log: Log = _quiet) -> TrainSummary:
    """Run (or resume) training as `config` says; under torchrun every rank calls this.

    Only rank 0 logs (through `log`) and writes files. Raises AprError subclasses for bad
    input; with --init there is no path that trains from random weights.
    """
    validate_config(config)
    ctx = distributed.setup(config.device)
    try:
        return _train(config, ctx, log if ctx.is_main else _quiet)
    finally:
        distributed.teardown(ctx)


def _train(config: TrainConfig, ctx: DistContext, log: Log) -> TrainSummary:
    if config.batch_size % ctx.world_size:
        raise InvalidArgument(
            None,
            f"{config.batch_size} sequences per micro-step cannot be split evenly over {ctx.world_size} processes",
            flag="--batch-size",
        )
    resume_ckpt = checkpoint.resolve_resume(config.resume) if config.resume else None
    scalars, saved = checkpoint.load_state(resume_ckpt) if resume_ckpt else ({}, {})
    source = inputs.model_source(config, resume_ckpt)
    run_dir = Path(config.out_dir) if config.out_dir else checkpoint.run_dir_of(resume_ckpt)
    if resume_ckpt is None and not config.check_only:
        refuse_existing_run(run_dir)
    arch = source.arch
    log(source.describe())
    log(f"parameters: {arch.param_count():,}")
    dataset, data_notes = inputs.load_data(config, source)
    has_masters = any(name.startswith(checkpoint.MASTER_PREFIX) for name in saved)
    model, weights_note, source_dtype = inputs.build_model(config, source, has_masters, log)
    log(f"weights: {weights_note}")
    for note in data_notes:
        log(note)
    start_step = int(scalars.get("step", 0))
    for warning in resume_drift(scalars, config, len(dataset.stream)):
        log(warning)
    if resume_ckpt is not None:
        log(f"resume: step {start_step}; optimizer, schedule, RNG and data position restored from {resume_ckpt}")
    elif source.weights is not None:
        log("init: weights only -- fresh optimizer, schedule and data position, starting at step 0")
    summary = dict(
        run_dir=os.fspath(run_dir), architecture=dataclasses.asdict(arch), param_count=arch.param_count(),
        weights=weights_note, start_step=start_step, train_tokens=dataset.split.n_train,
        val_tokens=dataset.split.n_val, world_size=ctx.world_size, end_step=start_step, start_val_loss=None,
        final_val_loss=None, final_loss=None, tokens_per_s=None, checkpoint=None, final=None, replica_sha256=None,
    )
    if config.check_only:
        log("check only: architecture, weights, tokenizer and data agree; not training")
        return TrainSummary(**{**summary, "run_dir": None})

    precision = Precision.for_run(ctx.device, config.dtype, source_dtype)
    par = parallel.wrap(model, ctx, compile=config.compile)
    optimizer = build_optimizer(par.module, config, ctx.device)
    record = config_record(config)
    checkpointer = checkpoint.Checkpointer(run_dir, ctx, par, optimizer, precision, config, record, source,
                                           dataset, log)
    if saved:
        checkpointer.restore(saved)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    state = TrainState(step=start_step, tokens_seen=int(scalars.get("tokens_seen", start_step * tokens_per_step)),
                       loss=scalars.get("loss"))
    runlog = RunLog(run_dir, ctx, log, config.steps, config.log_every)
    runlog.open(start_step, record)
    try:
        trainer = Trainer(config, ctx, dataset, par, optimizer, precision, checkpointer, runlog, state,
                          source.start_label)
        return TrainSummary(**{**summary, **trainer.run()})
    finally:
        runlog.close()
