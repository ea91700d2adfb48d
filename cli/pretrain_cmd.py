"""`apr pretrain` (alias `apr train`): train from --init model.apr or a built-in architecture; torchrun-ready."""

from __future__ import annotations

import dataclasses

import click

from apr_trainer.config import TrainConfig, resume_config
from apr_trainer.distributed import is_main_process
from apr_trainer.train import train

from .render import echo_json, escape

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _d(name: str) -> str:
    return f"(default {_DEFAULTS[name]})"


@click.command("pretrain")
@click.option("--init", metavar="MODEL.apr", help="Start from these weights (weights only: new optimizer, step 0).")
@click.option("--data", "--dataset", "data", metavar="PATH",
              help="Token shards: an `apr tokenize` folder or its index.json, a .bin (+ .bin.json sidecar; bare = "
                   "aprender u32), a folder or quoted glob of .bin files; or text (.txt/.md, .jsonl, .parquet, "
                   "+ .gz/.zst, folders, globs), tokenized in memory.")
@click.option("--out", "out_dir", metavar="RUN_DIR", help="Run folder: metrics.jsonl, checkpoints/, final.apr.")
@click.option("--resume", metavar="RUN_DIR|CKPT.apr", help="Continue a run exactly where its checkpoint stopped.")
@click.option("--arch", metavar="NAME", help="Built-in architecture for random init: llama-370m (default), tiny.")
@click.option("--arch-config", "arch_config", metavar="FILE.json", help="Architecture JSON for random init.")
@click.option("--tokenizer", metavar="tokenizer.json", help="Tokenizer for text data (default: the one inside --init).")
@click.option("--steps", type=int, help=f"Optimizer steps {_d('steps')}.")
@click.option("--batch-size", "batch_size", type=int, help=f"Sequences per micro-step, all ranks {_d('batch_size')}.")
@click.option("--seq-len", "seq_len", type=int, help=f"Tokens per sequence {_d('seq_len')}.")
@click.option("--lr", type=float, help=f"Peak learning rate {_d('lr')}.")
@click.option("--min-lr-ratio", "min_lr_ratio", type=float, help=f"Cosine floor as a share of lr {_d('min_lr_ratio')}.")
@click.option("--warmup", type=int, help=f"Linear warmup steps {_d('warmup')}.")
@click.option("--grad-accum", "grad_accum", type=int, help=f"Micro-steps per optimizer step {_d('grad_accum')}.")
@click.option("--grad-clip", "grad_clip", type=float, help=f"Clip the gradient norm; 0 = off {_d('grad_clip')}.")
@click.option("--weight-decay", "weight_decay", type=float, help=f"AdamW decay on matrices {_d('weight_decay')}.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), help=f"{_d('device')}; auto = cuda if available.")
@click.option("--compile", "compile", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--val-every", "val_every", type=int, help=f"Validate every N steps; 0 = start/end {_d('val_every')}.")
@click.option("--val-batches", "val_batches", type=int, help=f"Validation batches {_d('val_batches')}.")
@click.option("--val-fraction", "val_fraction", type=float, help=f"Held-out tail of the data {_d('val_fraction')}.")
@click.option("--save-every", "save_every", type=int, help=f"Checkpoint every N steps; 0 = end {_d('save_every')}.")
@click.option("--seed", type=int, help=f"Seed for init and data order {_d('seed')}.")
@click.option("--dtype", type=click.Choice(["auto", "f32", "bf16", "f16"]),
              help="Dtype of saved weights; auto = the --init file's, f32 for random init.")
@click.option("--log-every", "log_every", type=int, help=f"Progress line every N steps {_d('log_every')}.")
@click.option("--check-only", "check_only", is_flag=True, default=None,
              help="Load and check architecture, weights, tokenizer and data, then exit.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout at the end.")
@click.option("-q", "--quiet", is_flag=True, help="No log lines on stderr (errors still show).")
def pretrain_cmd(as_json: bool, quiet: bool, **options) -> None:
    """Train a decoder LM and write .apr checkpoints; run under `torchrun --nproc_per_node N` for DDP.

    Metrics go to RUN_DIR/metrics.jsonl (one JSON object per step); logs to stderr.
    """
    given = {k: v for k, v in options.items() if v is not None}
    if given.get("resume"):
        config = resume_config(given.pop("resume"), given)
    else:
        if not given.get("data"):
            raise click.UsageError("--data is required (or --resume a run)")
        config = TrainConfig(**given)
    main_rank = is_main_process()
    log = (lambda line: None) if quiet or not main_rank else (lambda line: click.echo(escape(line), err=True))
    summary = train(config, log)
    if as_json and main_rank:
        echo_json(dataclasses.asdict(summary))
