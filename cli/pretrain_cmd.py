"""`apr pretrain` (alias `apr train`): train from --init model.apr or a built-in architecture; torchrun-ready."""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys

import click
from click.core import ParameterSource

from apr_trainer.config import TrainConfig, resume_config
from apr_trainer.distributed import is_main_process
from apr_trainer.guards import SaveAborted
from apr_trainer.runlog import TrainSummary
from apr_trainer.train import train

from apr_format.errors import InvalidArgument

from .options import output_option
from .render import echo_json, escape

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _default(name: str) -> dict:
    """TrainConfig's default for an option, shown in the help (`--resume` tells given flags from
    defaults by their parameter source, not by value)."""
    return {"default": _DEFAULTS[name], "show_default": True}


@click.command("pretrain")
@click.option("--init", metavar="MODEL.apr", help="Start from these weights (weights only: new optimizer, step 0).")
@click.option("--data", "--dataset", "data", metavar="PATH",
              help="Required unless --resume. Token shards: an `apr tokenize` folder or its index.json, a .bin "
                   "(+ .bin.json sidecar; bare = aprender u32), a folder or quoted glob of .bin files; or text "
                   "(.txt/.md, .jsonl, .parquet, + .gz/.zst, folders, globs), tokenized in memory.")
@output_option("Run folder: metrics.jsonl, checkpoints/, final.apr.", "RUN_DIR", required=False, dest="out_dir",
               hidden_aliases=("--out",))
@click.option("--resume", metavar="RUN_DIR|CKPT.apr", help="Continue a run exactly where its checkpoint stopped.")
@click.option("--arch", metavar="NAME", help="Built-in architecture for random init: llama-370m (default), tiny.")
@click.option("--arch-config", "arch_config", metavar="FILE.json", help="Architecture JSON for random init.")
@click.option("--tokenizer", metavar="tokenizer.json", help="Tokenizer for text data (default: the one inside --init).")
@click.option("--steps", type=int, help="Optimizer steps.", **_default("steps"))
@click.option("--batch-size", "batch_size", type=int, help="Sequences per micro-step, all ranks.",
              **_default("batch_size"))
@click.option("--seq-len", "seq_len", type=int, help="Tokens per sequence.", **_default("seq_len"))
@click.option("--lr", type=float, help="Peak learning rate.", **_default("lr"))
@click.option("--min-lr-ratio", "min_lr_ratio", type=float, help="Cosine floor as a share of lr.",
              **_default("min_lr_ratio"))
@click.option("--warmup", type=int, help="Linear warmup steps.", **_default("warmup"))
@click.option("--grad-accum", "grad_accum", type=int, help="Micro-steps per optimizer step.",
              **_default("grad_accum"))
@click.option("--grad-clip", "grad_clip", type=float, help="Clip the gradient norm; 0 = off.",
              **_default("grad_clip"))
@click.option("--weight-decay", "weight_decay", type=float, help="AdamW decay on matrices.",
              **_default("weight_decay"))
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), help="Where to train; auto = cuda if available.",
              **_default("device"))
@click.option("--compile", "compile", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--strategy", type=click.Choice(["auto", "ddp", "fsdp"]),
              help="Under torchrun, ddp replicates the model on every rank, fsdp shards weights, gradients and "
                   "optimizer state (FSDP2); auto picks fsdp when DDP's 16 bytes per parameter would exceed half "
                   "of one device's memory. One process: plain (fsdp: one shard).", **_default("strategy"))
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16-mixed"]),
              help="bf16-mixed computes in bf16 (autocast; FSDP: bf16 parameters, fp32 gradient reduction) over "
                   "fp32 master weights; auto = bf16-mixed on CUDA GPUs with bf16, else fp32.",
              **_default("precision"))
@click.option("--activation-checkpointing", "activation_checkpointing", is_flag=True, default=None,
              help="Recompute each decoder layer in backward: same loss and gradients, less activation memory.")
@click.option("--val-every", "val_every", type=int, help="Validate every N steps; 0 = start/end.",
              **_default("val_every"))
@click.option("--val-batches", "val_batches", type=int, help="Validation batches.", **_default("val_batches"))
@click.option("--val-fraction", "val_fraction", type=float, help="Held-out tail of the data.",
              **_default("val_fraction"))
@click.option("--save-every", "save_every", type=int, help="Checkpoint every N steps; 0 = end.",
              **_default("save_every"))
@click.option("--seed", type=int, help="Seed for init and data order.", **_default("seed"))
@click.option("--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]),
              help="Dtype of saved weights; auto = the --init file's, f32 for random init.", **_default("dtype"))
@click.option("--log-every", "log_every", type=int, help="Progress line every N steps.",
              **_default("log_every"))
@click.option("--check-only", "check_only", is_flag=True, default=None,
              help="Load and check architecture, weights, tokenizer and data, then exit.")
@click.option("--max-skipped-steps", "max_skipped_steps", type=int,
              help="Stop after this many consecutive steps skipped for a NaN/Inf loss or gradient norm.",
              **_default("max_skipped_steps"))
@click.option("--keep-last", "keep_last", type=int,
              help="Keep only the newest N intermediate checkpoints (default: all; final.apr is always kept).")
@click.option("--force", is_flag=True, default=None,
              help="Replace a run (with checkpoints) already in -o/--output instead of refusing.")
@click.option("--strict", is_flag=True, default=None,
              help="Refuse, instead of warning about, a tokenizer that is not the one in the --init file.")
@click.option("--tensorboard", is_flag=True, default=None,
              help="Also write TensorBoard event files beside metrics.jsonl (extra: pip install "
                   "'apr-toolkit[tensorboard]').")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout at the end.")
@click.option("-q", "--quiet", is_flag=True, help="No log lines on stderr (errors still show).")
@click.pass_context
def pretrain_cmd(ctx: click.Context, as_json: bool, quiet: bool, **options) -> None:
    """Train a decoder LM and write .apr checkpoints; run under `torchrun --nproc_per_node N` for DDP or FSDP.

    Metrics go to RUN_DIR/metrics.jsonl (one JSON object per step); logs to stderr. SIGTERM, SIGINT
    or SIGUSR1 stop after the current step with a checkpoint (exit 128+signal, with the --resume
    command); a second signal during that save aborts it.

    
    Examples:
      apr pretrain --init model.apr --data docs/ -o run --steps 1000 --keep-last 2
      apr pretrain --resume run
      torchrun --nproc_per_node 2 -m apr_cli.main pretrain --init model.apr --data tokens.bin -o run
      torchrun --nproc_per_node 8 $(which apr) pretrain --init qwen7b.apr --data corpus-tok -o run \\
          --strategy fsdp --precision bf16-mixed --activation-checkpointing
    """
    given = {k: v for k, v in options.items()
             if v is not None and ctx.get_parameter_source(k) is not ParameterSource.DEFAULT}
    if given.get("resume"):
        config = resume_config(given.pop("resume"), given)
    else:
        if not given.get("data"):
            raise InvalidArgument("--data", "missing (required unless --resume)")
        config = TrainConfig(**given)
    main_rank = is_main_process()
    log = (lambda line: None) if quiet or not main_rank else (lambda line: click.echo(escape(line), err=True))
    try:
        summary = train(config, log)
    except SaveAborted as abort:
        click.echo(f"apr: error: {escape(abort.message)}", err=True)
        sys.exit(128 + abort.signum)
    if main_rank and summary.stopped_by is not None:
        click.echo(escape(stop_line(summary)), err=True)  # shown even with -q: it says how to continue
    elif as_json and main_rank:
        echo_json(dataclasses.asdict(summary))
    elif main_rank and not quiet and summary.run_dir is not None:
        for line in summary_table(summary):
            click.echo(escape(line), err=True)
    code = 128 + int(signal.Signals[summary.stopped_by]) if summary.stopped_by is not None else 0
    if summary.world_size > 1:
        # A torchrun worker whose run is complete (files written, group left) exits at once: under load
        # the interpreter's teardown of torch's distributed objects could abort (SIGABRT) after the run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)


def stop_line(summary: TrainSummary) -> str:
    """The one line a stopped run ends with: where its checkpoint is and how to continue it."""
    run_dir = shlex.quote(os.path.abspath(summary.run_dir or "."))
    command = f"apr pretrain --resume {run_dir}"
    if summary.world_size > 1:
        command = f"the same torchrun command with: pretrain --resume {run_dir}"
    if summary.checkpoint is None:
        return (f"apr: stopped by {summary.stopped_by} before any step: nothing to save; start again with the "
                "same command (the run folder holds no checkpoint and is reused)")
    return (f"apr: stopped by {summary.stopped_by} at step {summary.end_step}: checkpoint {os.path.abspath(summary.checkpoint)}; "
            f"continue with: {command}")


def summary_table(summary: TrainSummary) -> list[str]:
    """The run summary as the lines of a two-column table."""
    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    rows = [("steps", f"{summary.start_step} -> {summary.end_step}"), ("tokens", f"{summary.tokens_seen:,}"),
            ("val loss", f"{loss(summary.start_val_loss)} -> {loss(summary.final_val_loss)}"),
            ("tokens/s", "-" if summary.tokens_per_s is None else f"{summary.tokens_per_s:,.0f}"),
            ("skipped steps", str(summary.skipped_steps)), ("final", summary.final or "-")]
    width = max(len(name) for name, _ in rows)
    return ["run summary:", *(f"  {name:<{width}}  {value}" for name, value in rows)]
