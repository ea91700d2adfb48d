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
from .guards import NonFiniteGuard, StopSignal
from .loop import Trainer, TrainState
from .optim import build_optimizer, capped_warmup
from .precision import Precision
from .runlog import RunLog, TrainSummary, check_run_dir, require_tensorboard

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def train(config: TrainConfig, log: Log = _quiet) -> TrainSummary:
    """Run (or resume) training as `config` says; under torchrun every rank calls this.

    Only rank 0 logs (through `log`) and writes files. Raises AprError subclasses for bad
    input; with --init there is no path that trains from random weights. SIGTERM, SIGINT and
    SIGUSR1 stop the run after the current step with a checkpoint (`TrainSummary.stopped_by`);
    a second signal during that save raises `guards.SaveAborted`.
    """
    validate_config(config)
    ctx = distributed.setup(config.device, group_of_one=config.strategy == "fsdp")
    try:
        with StopSignal().installed() as stop:
            summary = _train(config, ctx, log if ctx.is_main else _quiet, stop)
        distributed.barrier(ctx)  # no rank leaves the group while another still sends to it
        return summary
    finally:
        distributed.teardown(ctx)


def _train(config: TrainConfig, ctx: DistContext, log: Log, stop: StopSignal) -> TrainSummary:
    if config.batch_size % ctx.world_size:
        raise InvalidArgument(
            None,
            f"{config.batch_size} sequences per micro-step cannot be split evenly over {ctx.world_size} processes",
            flag="--batch-size",
        )
    resume_ckpt = checkpoint.resolve_resume(config.resume) if config.resume else None
    run_dir = Path(config.out_dir) if config.out_dir else checkpoint.run_dir_of(resume_ckpt)
    check_run_dir(run_dir, resuming=resume_ckpt is not None, force=config.force)
    if config.tensorboard:
        require_tensorboard()
    warmup_note = None
    if resume_ckpt is None:
        config, warmup_note = capped_warmup(config)
    scalars = checkpoint.load_scalars(resume_ckpt) if resume_ckpt else {}
    saved = checkpoint.open_state(resume_ckpt) if resume_ckpt else {}
    source = inputs.model_source(config, resume_ckpt)
    arch = source.arch
    log(source.describe())
    log(f"parameters: {arch.param_count():,}")
    dataset, data_notes = inputs.load_data(config, source)
    weights = inputs.build_model(config, source, saved, log)
    log(f"weights: {weights.note}")
    for note in data_notes + ([warmup_note] if warmup_note else []):
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
        weights=weights.note, start_step=start_step, train_tokens=dataset.split.n_train,
        val_tokens=dataset.split.n_val, world_size=ctx.world_size, end_step=start_step, start_val_loss=None,
        final_val_loss=None, final_loss=None, tokens_per_s=None, checkpoint=None, final=None, replica_sha256=None,
        strategy=None, precision=None, peak_memory_bytes=None,
    )
    if config.check_only:
        log("check only: architecture, weights, tokenizer and data agree; not training")
        return TrainSummary(**{**summary, "run_dir": None})

    precision = Precision.for_run(ctx.device, config.precision, config.dtype, weights.source_dtype)
    strategy, why = parallel.choose_strategy(config.strategy, ctx, arch.param_count())
    log(f"parallel: {strategy} over {ctx.world_size} rank(s) ({why}); precision {precision.name}"
        f"{'; activation checkpointing' if config.activation_checkpointing else ''}")
    par = parallel.wrap(weights.model, weights.sources, ctx, precision, strategy, compile=config.compile,
                        activation_checkpointing=config.activation_checkpointing)
    del weights  # the on-demand sources: each rank keeps only its own rows
    summary.update(strategy=par.strategy, precision=precision.name)
    optimizer = build_optimizer(par.module, config, ctx.device)
    record = config_record(config)
    checkpointer = checkpoint.Checkpointer(run_dir, ctx, par, optimizer, precision, config, record, source,
                                           dataset, log)
    if saved:
        checkpointer.restore(saved)
    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    state = TrainState(step=start_step, tokens_seen=int(scalars.get("tokens_seen", start_step * tokens_per_step)),
                       loss=scalars.get("loss"), skipped_steps=int(scalars.get("skipped_steps", 0)))
    runlog = RunLog(run_dir, ctx, log, config.steps, config.log_every, config.keep_last, config.tensorboard,
                    config.force)
    runlog.open(start_step, record)
    try:
        trainer = Trainer(config, ctx, dataset, par, optimizer, precision, checkpointer, runlog, state,
                          source.start_label, stop, NonFiniteGuard(config.max_skipped_steps), resume_ckpt)
        return TrainSummary(**{**summary, **trainer.run()})
    finally:
        runlog.close()
