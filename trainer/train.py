"""The training loop: `TrainConfig` and `train()` (AdamW, warmup + cosine, clipping, accumulation, DDP, checkpoints)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_format import open_apr
from apr_format.architecture import ArchitectureConfig, read_architecture
from apr_format.atomic import claim_folder
from apr_format.errors import InvalidArgument, OutputExists
from apr_format.init_tensors import UnusedTensorWarning, expected_parameter_shapes, load_init_tensors

from . import checkpoint, distributed
from .data import TokenDataset, TokenStream, open_tokens
from .distributed import DistContext
from .model import DecoderLM
from .presets import DEFAULT_PRESET, load_arch_config, preset
from .tokenization import (
    HF_FILES_KEY,
    TOKENIZER_KEY,
    TokenizerInfo,
    carried_tokenizer_text,
    check_vocab,
    load_tokenizer,
)

METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
SAVE_DTYPES = ("auto", "f32", "bf16", "f16")
SAMPLER = "seeded-windows-v1"  # windows of step s come from SeedSequence([seed, s]) (data.TokenDataset)
_FLOAT_DTYPES = ("f32", "bf16", "f16")
# Settings a resumed run takes from its checkpoint and that the command line may not change.
_FIXED_ON_RESUME = ("init", "arch", "arch_config")
# Settings that shape the loss curve: changing them on resume is allowed, and warned about.
_REPRODUCIBILITY_KEYS = ("data", "steps", "batch_size", "seq_len", "grad_accum", "lr", "min_lr_ratio", "warmup",
                         "grad_clip", "weight_decay", "beta1", "beta2", "seed", "val_fraction")

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class TrainConfig:
    """Everything one run needs. `batch_size` is the global micro-batch (all ranks together):
    an optimizer step sees batch_size * grad_accum sequences of seq_len tokens whatever the
    number of processes, so the same command gives the same run under torchrun."""

    data: str
    out_dir: str | None = None  # default on --resume: the resumed run's folder
    init: str | None = None  # weights only: fresh optimizer, step 0
    resume: str | None = None  # a run folder or checkpoints/step-*.apr: restore everything
    arch: str | None = None  # preset name for random init (default llama-370m)
    arch_config: str | None = None  # JSON architecture file for random init
    tokenizer: str | None = None  # tokenizer.json (else the one inside the --init .apr)
    steps: int = 1000
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    weight_decay: float = 0.1  # on matrices only; norms and biases get none
    beta1: float = 0.9
    beta2: float = 0.95
    device: str = "auto"
    compile: bool = False
    val_every: int = 100  # 0: only at the start and the end
    val_batches: int = 8  # validation uses up to val_batches * batch_size fixed windows
    val_fraction: float = 0.05
    save_every: int = 500  # 0: only at the end
    seed: int = 0
    dtype: str = "auto"  # of the saved weights: auto = the --init file's (f32 for random init)
    log_every: int = 10
    check_only: bool = False  # load and check everything, then stop before the first step


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


def validate_config(config: TrainConfig) -> None:
    """Reject contradictory or out-of-range settings before anything is loaded.

    Raises:
        InvalidArgument: naming the flag.
    """
    if config.init and (config.arch or config.arch_config):
        raise InvalidArgument(
            "--init", "conflicts with --arch/--arch-config: the architecture comes from the checkpoint"
        )
    if config.arch and config.arch_config:
        raise InvalidArgument("--arch", "conflicts with --arch-config: give one architecture")
    if config.out_dir is None and not config.resume:
        raise InvalidArgument("--out", "is required (the run folder)")
    positive = {"--batch-size": config.batch_size, "--seq-len": config.seq_len, "--grad-accum": config.grad_accum,
                "--val-batches": config.val_batches, "--log-every": config.log_every}
    non_negative = {"--steps": config.steps, "--warmup": config.warmup, "--val-every": config.val_every,
                    "--save-every": config.save_every, "--grad-clip": config.grad_clip,
                    "--weight-decay": config.weight_decay}
    for flag, value in positive.items():
        if value < 1:
            raise InvalidArgument(flag, f"must be at least 1, got {value}")
    for flag, value in non_negative.items():
        if value < 0:
            raise InvalidArgument(flag, f"must be >= 0, got {value}")
    if not config.lr > 0:
        raise InvalidArgument("--lr", f"must be > 0, got {config.lr}")
    if not 0.0 <= config.min_lr_ratio <= 1.0:
        raise InvalidArgument("--min-lr-ratio", f"must be in [0, 1], got {config.min_lr_ratio}")
    if config.dtype not in SAVE_DTYPES:
        raise InvalidArgument("--dtype", f"unknown {config.dtype!r} (choose {', '.join(SAVE_DTYPES)})")


def resume_config(resume: str | os.PathLike, overrides: Mapping[str, Any]) -> TrainConfig:
    """The config of the run being resumed, with `overrides` (flags given on the command line).

    Raises:
        InvalidArgument: an override of --init/--arch/--arch-config, or an unknown setting.
        Plus `checkpoint.load_state`'s errors.
    """
    ckpt = checkpoint.resolve_resume(resume)
    scalars, _ = checkpoint.load_state(ckpt)
    saved = dict(scalars.get("config") or {})
    for key in _FIXED_ON_RESUME:
        if overrides.get(key) is not None:
            flag = "--" + key.replace("_", "-")
            raise InvalidArgument(
                flag, "cannot be combined with --resume: a resumed run keeps its weights and architecture"
            )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise InvalidArgument(None, f"unknown training setting(s): {', '.join(unknown)}")
    values = {k: v for k, v in saved.items() if k in known}
    values.update(overrides)
    values["resume"] = os.fspath(resume)
    if overrides.get("out_dir") is None:
        values["out_dir"] = os.fspath(_run_dir_of(ckpt))
    return TrainConfig(**values)


def _run_dir_of(ckpt: Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/step-N.apr (the checkpoint's folder otherwise)."""
    return ckpt.parent.parent if ckpt.parent.name == checkpoint.CHECKPOINT_DIR else ckpt.parent


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class _Source:
    """Where the model comes from: its architecture, weights file (None = random) and metadata."""

    arch: ArchitectureConfig
    weights: str | None
    metadata: dict[str, Any]
    label: str  # how the log names it
    exact_vocab: int | None  # spec: without --init the tokenizer must match llama-370m's exactly


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
            "--batch-size",
            f"{config.batch_size} sequences per micro-step cannot be split evenly over {ctx.world_size} processes",
        )
    resume_ckpt = checkpoint.resolve_resume(config.resume) if config.resume else None
    scalars, state = checkpoint.load_state(resume_ckpt) if resume_ckpt else ({}, {})
    source = _model_source(config, resume_ckpt)
    run_dir = Path(config.out_dir) if config.out_dir else _run_dir_of(resume_ckpt)
    if resume_ckpt is None and not config.check_only:
        _refuse_existing_run(run_dir)
    arch = source.arch
    log(f"architecture: {arch.family} from {source.label}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_heads} heads / {arch.num_kv_heads} kv heads, vocab {arch.vocab_size}, "
        f"{'tied' if arch.tie_word_embeddings else 'untied'} embeddings")
    log(f"parameters: {arch.param_count():,}")
    dataset, data_notes = _load_data(config, source)
    model, weights_note, source_dtype = _build_model(config, source, state, log)
    log(f"weights: {weights_note}")
    for note in data_notes:
        log(note)
    start_step = int(scalars.get("step", 0))
    for warning in _resume_drift(scalars, config, len(dataset.stream)):
        log(warning)
    if resume_ckpt is not None:
        log(f"resume: step {start_step}; optimizer, schedule, RNG and data position restored from {resume_ckpt}")
    elif source.weights is not None:
        log("init: weights only -- fresh optimizer, schedule and data position, starting at step 0")
    save_dtype = source_dtype if config.dtype == "auto" else config.dtype
    summary = dict(
        run_dir=os.fspath(run_dir), architecture=dataclasses.asdict(arch), param_count=arch.param_count(),
        weights=weights_note, start_step=start_step, train_tokens=dataset.split.n_train,
        val_tokens=dataset.split.n_val, world_size=ctx.world_size,
    )
    if config.check_only:
        log("check only: architecture, weights, tokenizer and data agree; not training")
        return _summary(summary, end_step=start_step, run_dir=None)
    return _Loop(config, ctx, log, source, dataset, model, save_dtype, run_dir, start_step, scalars, state,
                 summary).run()


def _resume_drift(scalars: Mapping[str, Any], config: TrainConfig, num_tokens: int) -> list[str]:
    """Warnings for settings changed since the checkpoint: the curve then differs from an uninterrupted run."""
    if not scalars:
        return []
    saved = scalars.get("config") or {}
    now = _config_record(config)
    out = [f"warning: --{key.replace('_', '-')} changed from {saved[key]} to {now[key]} since the checkpoint"
           for key in _REPRODUCIBILITY_KEYS if key in saved and saved[key] != now[key]]
    before = (scalars.get("data") or {}).get("num_tokens")
    if before is not None and before != num_tokens:
        out.append(f"warning: the data held {before:,} tokens at the checkpoint and now {num_tokens:,}: "
                   "the resumed run will not see the same batches")
    return out


def _model_source(config: TrainConfig, resume_ckpt: Path | None) -> _Source:
    if resume_ckpt is not None:
        with open_apr(resume_ckpt) as f:
            meta = {k: v for k, v in f.metadata.items() if k != "training"}
        exact = _exact_vocab(config)
        return _Source(read_architecture(resume_ckpt), os.fspath(resume_ckpt), meta, os.fspath(resume_ckpt), exact)
    if config.init is not None:
        with open_apr(config.init) as f:
            meta = dict(f.metadata)
        return _Source(read_architecture(config.init), config.init, meta, config.init, None)
    if config.arch_config is not None:
        arch, label = load_arch_config(config.arch_config), f"--arch-config {config.arch_config}"
    else:
        name = config.arch or DEFAULT_PRESET
        arch, label = preset(name), f"preset {name}"
    meta = {**arch.to_metadata(), "param_count": arch.param_count()}
    return _Source(arch, None, meta, label, _exact_vocab(config))


def _exact_vocab(config: TrainConfig) -> int | None:
    """Spec: without --init, the tokenizer size must equal the default architecture's vocabulary."""
    if config.init is None and config.arch_config is None and (config.arch or DEFAULT_PRESET) == DEFAULT_PRESET:
        return preset(DEFAULT_PRESET).vocab_size
    return None


def _refuse_existing_run(run_dir: Path) -> None:
    if (run_dir / METRICS_FILE).exists() or (run_dir / checkpoint.CHECKPOINT_DIR).exists():
        raise OutputExists(
            run_dir, f"already holds a run ({METRICS_FILE} / {checkpoint.CHECKPOINT_DIR}/); continue it with "
            f"--resume {run_dir}, or choose a new --out",
        )


def _load_data(config: TrainConfig, source: _Source) -> tuple[TokenDataset, list[str]]:
    """Open the data and check every id fits the model, tokenizer first (before tokenizing)."""
    rows = source.arch.vocab_size
    loaded: list[TokenizerInfo] = []

    def tokenizer() -> TokenizerInfo:
        if not loaded:
            if config.tokenizer is None and source.weights is None:
                raise InvalidArgument(config.data, "text data needs a tokenizer: pass --tokenizer tokenizer.json")
            info = load_tokenizer(config.tokenizer, source.weights, source.metadata)
            check_vocab(rows, where=source.label, tokenizer=info, exact=source.exact_vocab)
            loaded.append(info)
        return loaded[0]

    if config.tokenizer is not None:
        tokenizer()
    stream = open_tokens(config.data, tokenizer=tokenizer)
    declared = stream.info.vocab_size if stream.info else None
    max_id = stream.max_id()
    check_vocab(rows, where=source.label, declared=declared, max_id=max_id, exact=source.exact_vocab)
    notes = [_data_note(stream, max_id, rows, loaded[0] if loaded else None)]
    carried = carried_tokenizer_text(source.metadata)
    made_with = stream.info.tokenizer_sha256 if stream.info else None
    if made_with and carried is not None and made_with != _sha256(carried):
        notes.append(
            f"warning: {stream.source} was tokenized with a different tokenizer than the one in {source.label}"
        )
    dataset = TokenDataset(stream, config.seq_len, config.val_fraction)
    split = dataset.split
    notes.append(f"split: {split.n_train:,} training tokens, last {split.n_val:,} held out for validation")
    if config.seq_len > source.arch.max_position_embeddings:
        notes.append(f"warning: --seq-len {config.seq_len} exceeds max_position_embeddings "
                     f"{source.arch.max_position_embeddings} of the architecture")
    return dataset, notes


def _data_note(stream: TokenStream, max_id: int, rows: int, tok: TokenizerInfo | None) -> str:
    what = f"data: {stream.source}: {len(stream):,} tokens, max id {max_id} < {rows} rows"
    if tok is not None:
        what += f"; tokenizer {tok.source}: {tok.size} tokens <= {rows} rows"
    if stream.info is not None and stream.info.vocab_size is not None:
        what += f"; declared vocab_size {stream.info.vocab_size}"
    return what


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _build_model(
    config: TrainConfig, source: _Source, state: Mapping[str, torch.Tensor], log: Log
) -> tuple[DecoderLM, str, str]:
    """The model with its weights (fp32 master copy), the log line saying where they came from,
    and the stored float dtype of the source (checkpoints keep it by default)."""
    torch.manual_seed(config.seed)
    if source.weights is None:
        model = DecoderLM(source.arch)
        note = (f"RANDOM INIT of {source.label} (seed {config.seed}) -- no --init given, "
                "this model starts from scratch")
        return model, note, "f32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnusedTensorWarning)
        tensors = load_init_tensors(source.weights, source.arch, dtype=torch.float32)
    for warning in caught:
        if issubclass(warning.category, UnusedTensorWarning):
            log(f"warning: {warning.message}")
    expected = expected_parameter_shapes(source.arch)
    masters = {k[len("master."):]: v for k, v in state.items() if k.startswith("master.")}
    owned = {name: masters.get(name, t).to(torch.float32).clone() for name, t in tensors.items()}
    with torch.device("meta"):
        model = DecoderLM(source.arch)
    # strict + assign: a parameter missing from `owned` fails here, so nothing can stay random.
    model.load_state_dict(owned, strict=True, assign=True)
    stored = tensors.source_dtypes.get("model.embed_tokens.weight", "f32")
    note = f"loaded {len(owned)}/{len(expected)} tensors from {source.weights}"
    if tensors.dropped_tied_head:
        note += " (its lm_head.weight is the tied copy of the embedding, checked byte for byte)"
    if masters:
        note += f"; fp32 master weights from {checkpoint.STATE_TENSORS} sidecar"
    return model, note, stored if stored in _FLOAT_DTYPES else "f32"


def _summary(fields: dict[str, Any], **more: Any) -> TrainSummary:
    defaults = dict(start_val_loss=None, final_val_loss=None, final_loss=None, tokens_per_s=None,
                    checkpoint=None, final=None, replica_sha256=None)
    return TrainSummary(**{**defaults, **fields, **more})


class _Loop:
    """One run's mutable state while training (kept out of module globals)."""

    def __init__(self, config: TrainConfig, ctx: DistContext, log: Log, source: _Source, dataset: TokenDataset,
                 model: DecoderLM, save_dtype: str, run_dir: Path, start_step: int, scalars: dict[str, Any],
                 state: Mapping[str, torch.Tensor], summary: dict[str, Any]) -> None:
        self.config, self.ctx, self.log, self.source, self.dataset = config, ctx, log, source, dataset
        self.save_dtype, self.run_dir, self.start_step, self.summary = save_dtype, run_dir, start_step, summary
        self.device = ctx.device
        self.model = model.to(self.device)
        self.names = {p: n for n, p in self.model.named_parameters()}
        self.optimizer = self._optimizer()
        if state:
            checkpoint.restore_optimizer(self.optimizer, self.names, state, config.resume or "")
            checkpoint.restore_rng(state, self.device)
        self.ddp = None
        target: torch.nn.Module = self.model
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = target = DistributedDataParallel(self.model, device_ids=ids)
        self.step_model = torch.compile(target) if config.compile else target
        self.local_batch = config.batch_size // ctx.world_size
        self.tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
        self.tokens_seen = int(scalars.get("tokens_seen", start_step * self.tokens_per_step))
        self.last_loss: float | None = scalars.get("loss")
        self.last_val: float | None = None
        self.last_val_step = -1
        self.metrics = None
        self.run_lock: int | None = None

    def _optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = True if self.device.type == "cuda" else None
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(self.config.beta1, self.config.beta2),
                                 eps=1e-8, fused=fused)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        distributed.run_on_main(self.ctx, self._open_run_dir)
        try:
            return self._run()
        finally:
            self._close()

    def _run(self) -> TrainSummary:
        config, ctx = self.config, self.ctx
        start_val = self.evaluate()
        if self.start_step == 0:
            self.log(f"step 0 (before any update): val_loss {start_val:.4f} -- {self._start_label()}")
            self._record({"step": 0, "val_loss": start_val, "tokens_seen": 0})
        else:
            self.log(f"step {self.start_step} (resumed): val_loss {start_val:.4f}")
        self.last_val, self.last_val_step = start_val, self.start_step
        rates, last_ckpt = [], None
        if self.start_step >= config.steps:
            self.log(f"nothing to train: at step {self.start_step} of --steps {config.steps}")
        for step in range(self.start_step, config.steps):
            record = self._train_step(step)
            done = step + 1
            rates.append(record["tokens_per_s"])
            if (config.val_every and done % config.val_every == 0) or done == config.steps:
                record["val_loss"] = self.last_val = self.evaluate()
                self.last_val_step = done
            self._record(record)
            if done % config.log_every == 0 or done == config.steps or "val_loss" in record:
                self.log(_progress(record, config.steps))
            if done == config.steps or (config.save_every and done % config.save_every == 0):
                replicas = self._replica_check() if done == config.steps else None
                last_ckpt = checkpoint.checkpoint_path(self.run_dir, done)  # on every rank: same branches
                distributed.run_on_main(ctx, functools.partial(self._save, done, last_ckpt, replicas))
                if replicas is not None:
                    self.summary["replica_sha256"] = replicas
        final = None
        if last_ckpt is not None:
            final = distributed.run_on_main(ctx, lambda: checkpoint.publish_final(last_ckpt, self.run_dir))
            self.log(f"saved {last_ckpt} and {final}")
        mean_rate = float(np.mean(rates[1:] if len(rates) > 1 else rates)) if rates else None
        return _summary(
            self.summary, end_step=max(self.start_step, config.steps), start_val_loss=start_val,
            final_val_loss=self.last_val, final_loss=self.last_loss, tokens_per_s=mean_rate,
            checkpoint=os.fspath(last_ckpt) if last_ckpt else None, final=os.fspath(final) if final else None,
        )

    def _start_label(self) -> str:
        if self.source.weights is None:
            return f"RANDOM INIT ({self.source.label})"
        return f"weights from {self.source.weights}"

    def _train_step(self, step: int) -> dict[str, Any]:
        config, ctx = self.config, self.ctx
        began = time.perf_counter()
        lr = lr_at(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        starts = self.dataset.train_starts(config.seed, step, config.grad_accum, config.batch_size)
        mine = starts[:, ctx.rank * self.local_batch : (ctx.rank + 1) * self.local_batch]
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(config.grad_accum):
            window = torch.from_numpy(self.dataset.windows(mine[micro])).to(self.device, non_blocking=True)
            last = micro == config.grad_accum - 1
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self.step_model(window[:, :-1], window[:, 1:])
                (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        clip = config.grad_clip if config.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        (total,) = distributed.all_reduce_sum(ctx, [loss_sum.item() / config.grad_accum])
        self.last_loss = total / ctx.world_size
        self.tokens_seen += self.tokens_per_step
        elapsed = time.perf_counter() - began
        return {"step": step + 1, "loss": self.last_loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens_per_s": self.tokens_per_step / elapsed, "tokens_seen": self.tokens_seen}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy over the fixed validation windows (each rank takes every world_size-th)."""
        starts = self.dataset.val_starts(self.config.val_batches * self.config.batch_size)
        mine = starts[self.ctx.rank :: self.ctx.world_size]
        total, count = 0.0, 0
        self.model.eval()
        for begin in range(0, len(mine), self.local_batch):
            window = torch.from_numpy(self.dataset.windows(mine[begin : begin + self.local_batch])).to(self.device)
            with self._autocast():
                loss = self.model(window[:, :-1], window[:, 1:])
            tokens = window[:, 1:].numel()
            total += loss.item() * tokens
            count += tokens
        self.model.train()
        total, count = distributed.all_reduce_sum(self.ctx, [total, float(count)])
        return total / count

    def _replica_check(self) -> list[str] | None:
        """Every rank's parameter digest; they must agree (DDP keeps replicas identical)."""
        if not self.ctx.enabled:
            return None
        digests = distributed.all_gather_strings(self.ctx, distributed.parameters_sha256(self.model.named_parameters()))
        if len(set(digests)) != 1:
            raise RuntimeError(f"DDP replicas hold different weights at the end of training: {digests}")
        self.log(f"replicas: all {len(digests)} ranks hold identical weights (sha256 {digests[0][:16]}...)")
        return digests

    # -- files (main rank only) -------------------------------------------------------------
    def _open_run_dir(self) -> None:
        self.run_lock = claim_folder(self.run_dir)  # one process per run folder; a second one is told our PID
        if self.config.resume is None:  # again, under the lock: a run started beside us may have finished
            _refuse_existing_run(self.run_dir)
        (self.run_dir / checkpoint.CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / METRICS_FILE
        if self.start_step and metrics.exists():  # drop what the interrupted run logged past its checkpoint
            kept = [line for line in metrics.read_text(encoding="utf-8").splitlines()
                    if (record := _record_of(line)) is not None and record.get("step", 0) <= self.start_step]
            checkpoint.write_text(metrics, "".join(line + "\n" for line in kept))
        checkpoint.write_text(self.run_dir / RUN_FILE, json.dumps(_config_record(self.config), indent=1) + "\n")
        self.metrics = open(metrics, "a", encoding="utf-8")

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()

    def _close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.run_lock is not None:
            os.close(self.run_lock)
            self.run_lock = None

    def _save(self, step: int, path: Path, replicas: list[str] | None) -> None:
        val = self.last_val if self.last_val_step == step else None
        training = {"step": step, "tokens_seen": self.tokens_seen, "loss": self.last_loss, "val_loss": val,
                    "init": self.config.init, "architecture_source": self.source.label, "seed": self.config.seed}
        meta = _checkpoint_metadata(self.source, self.config, training)
        params = {name: p for name, p in self.model.named_parameters()}
        checkpoint.save_weights(path, params, meta, dtype=self.save_dtype, tied=self.source.arch.tie_word_embeddings,
                                flags=checkpoint.flags_for(meta))
        tensors = {**checkpoint.optimizer_tensors(self.optimizer, self.names), **checkpoint.rng_tensors(self.device)}
        if self.save_dtype != "f32":  # the .apr holds rounded weights; resuming needs the exact ones
            tensors.update({f"master.{name}": p for name, p in params.items()})
        scalars = {
            "step": step, "tokens_seen": self.tokens_seen, "loss": self.last_loss, "val_loss": val,
            "config": _config_record(self.config), "save_dtype": self.save_dtype, "world_size": self.ctx.world_size,
            "schedule": {"kind": "linear-warmup-cosine", "lr": self.config.lr, "warmup": self.config.warmup,
                         "steps": self.config.steps, "min_lr_ratio": self.config.min_lr_ratio,
                         "next_lr": lr_at(step, self.config)},
            "data": {"source": self.dataset.stream.source, "num_tokens": len(self.dataset.stream),
                     "n_train": self.dataset.split.n_train, "n_val": self.dataset.split.n_val,
                     "sampler": SAMPLER, "next_step": step},
            "replica_sha256": replicas,
        }
        checkpoint.save_state(path, scalars, tensors)


def _checkpoint_metadata(source: _Source, config: TrainConfig, training: dict[str, Any]) -> dict[str, Any]:
    """The input's metadata (tokenizer keys included) plus `training`; one spelling of the tie flag.

    aprender writes `tied_embeddings` (spec: "Tied embeddings"); the HF spelling is dropped so
    the file never carries both.
    """
    meta = {k: v for k, v in source.metadata.items() if k not in ("training", "tie_word_embeddings")}
    meta["tied_embeddings"] = source.arch.tie_word_embeddings
    if config.tokenizer is not None and carried_tokenizer_text(meta) is None:
        files = dict(meta.get(HF_FILES_KEY) or {})
        files[TOKENIZER_KEY] = Path(config.tokenizer).read_text(encoding="utf-8")
        meta[HF_FILES_KEY] = files
    meta["training"] = training
    return meta


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The config as saved with a run: paths made absolute so a resume works from any folder."""
    record = dataclasses.asdict(config)
    for key in ("data", "out_dir", "init", "resume", "arch_config", "tokenizer"):
        if record[key] is not None:
            record[key] = os.path.abspath(record[key])
    return record


def _progress(record: dict[str, Any], steps: int) -> str:
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
