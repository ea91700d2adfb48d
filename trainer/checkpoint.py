"""Training checkpoints: weights as .apr, training state beside it as safetensors tensors + JSON scalars;
`Checkpointer` saves and restores a run's."""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apr_format import AprWriter, Flag
from apr_format.atomic import link_into_place, replacing
from apr_format.constants import DTYPE_BY_NAME
from apr_format.errors import AprError, CorruptSource, InvalidArgument

from . import distributed, guards
from .optim import schedule_record
from .state_file import TensorFile, write_tensors
from .tokenization import HF_FILES_KEY, TOKENIZER_KEY, carried_tokenizer_text

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import TokenDataset
    from .distributed import DistContext
    from .inputs import ModelSource
    from .loop import TrainState
    from .parallel import Parallel
    from .precision import Precision

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "final.apr"
STATE_JSON = ".state.json"  # scalars; written last, so its presence marks a complete checkpoint
STATE_TENSORS = ".state.safetensors"  # optimizer moments, RNG states, fp32 master weights if needed
STATE_FORMAT = "apr-train-state"
STATE_VERSION = 1
SAMPLER = "seeded-windows-v1"  # windows of step s come from SeedSequence([seed, s]) (data.TokenDataset)
MASTER_PREFIX = "master."  # fp32 master weights in the state file, when the .apr holds rounded ones
LINEAGE_KEYS = ("source", "original_format", "created_at")  # of the input: under training.lineage in checkpoints
_STEP_FILE = re.compile(r"^step-(\d+)\.apr$")
# aprender's runtime looks up lm_head.weight first (spec: "Tied embeddings").
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """RUN_DIR/checkpoints/step-000200.apr."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{step:06d}.apr"


def state_paths(apr_path: str | os.PathLike) -> tuple[Path, Path]:
    """The JSON and safetensors sidecars of a checkpoint: step-000200.state.json / .state.safetensors."""
    base = Path(apr_path)
    stem = base.name[: -len(".apr")] if base.name.endswith(".apr") else base.name
    return base.with_name(stem + STATE_JSON), base.with_name(stem + STATE_TENSORS)


def save_weights(
    path: str | os.PathLike, params: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], *,
    dtype: str, tied: bool, flags: int = 0, fetch: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Write model weights (canonical HF names) as an .apr, atomically, converting to `dtype`.

    A tied model also gets aprender's `lm_head.weight` copy and `tied_embeddings: true`. The file
    is planned from the shapes of `params`; each tensor's bytes come from `fetch(name)` (default:
    `params[name]`) when it is written, so a sharded model is gathered one tensor at a time.
    """
    torch_dtype = DTYPE_BY_NAME[dtype].to_torch()
    fetch = fetch or params.__getitem__
    meta = dict(metadata)
    sources = {name: name for name in params}
    if tied:
        meta["tied_embeddings"] = True
        sources[LM_HEAD] = EMBED
    with AprWriter(path, meta, flags=flags) as writer:
        for name, source in sources.items():
            writer.add(name, lambda s=source: fetch(s).detach().to("cpu", torch_dtype).contiguous(), dtype=dtype,
                       shape=tuple(params[source].shape))


def save_state(
    apr_path: str | os.PathLike, scalars: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
    fetch: Callable[[str], torch.Tensor] | None = None,
) -> None:
    """Write the training-state sidecars of the checkpoint at `apr_path` (tensors first, JSON last);
    `fetch` as in `state_file.write_tensors`."""
    json_path, tensors_path = state_paths(apr_path)
    with replacing(tensors_path) as out:
        write_tensors(out, tensors, fetch)
    body = {"format": STATE_FORMAT, "version": STATE_VERSION, "tensors_file": tensors_path.name, **scalars}
    write_text(json_path, json.dumps(body, indent=1, allow_nan=False))


def load_state(apr_path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The scalars and tensors saved beside a checkpoint, every tensor read whole (training reads
    only its rows: `open_state`).

    Raises:
        InvalidArgument: the checkpoint has no training state (weights only: use --init).
        CorruptSource: unreadable sidecars.
    """
    scalars = load_scalars(apr_path)
    tensors = open_state(apr_path)
    return scalars, {name: tensors[name][...] for name in tensors}


def open_state(apr_path: str | os.PathLike) -> TensorFile:
    """The state tensors saved beside a checkpoint, read on demand: each rank reads only the rows it holds.

    Raises:
        CorruptSource: an unreadable or damaged sidecar (Truncated also when it is cut short later).
    """
    tensors_path = state_paths(apr_path)[1]
    try:
        return TensorFile(tensors_path)
    except (AprError, OSError) as exc:
        problem = exc.problem if isinstance(exc, AprError) else exc.strerror or str(exc)
        raise CorruptSource(tensors_path, f"cannot read training state: {problem}") from None


def load_scalars(apr_path: str | os.PathLike) -> dict[str, Any]:
    """The JSON scalars saved beside a checkpoint (its commit marker), without the tensors.

    Raises:
        InvalidArgument: the checkpoint has no training state (weights only: use --init).
        CorruptSource: unreadable JSON.
    """
    json_path = state_paths(apr_path)[0]
    if not json_path.exists():
        raise InvalidArgument(
            apr_path, f"has no training state beside it ({json_path.name}); it holds weights only: "
            "start a new run from it with --init, or resume from the run folder or a checkpoints/step-*.apr",
        )
    try:
        scalars = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CorruptSource(json_path, "not valid JSON") from None
    if not isinstance(scalars, dict) or scalars.get("format") != STATE_FORMAT:
        raise CorruptSource(json_path, f"not an {STATE_FORMAT} file")
    if scalars.get("version") != STATE_VERSION:
        raise CorruptSource(json_path, f"state version {scalars.get('version')!r}, this apr reads {STATE_VERSION}")
    return scalars


def resolve_resume(path: str | os.PathLike) -> Path:
    """The checkpoint to resume: the file given, or the newest complete one in RUN_DIR/checkpoints.

    Raises:
        InvalidArgument: a folder without any complete checkpoint.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(2, "No such file or directory", os.fspath(root))
    if root.is_file():
        return root
    found = complete_checkpoints(root)
    if not found:
        raise InvalidArgument(
            root, f"no complete checkpoint (step-*.apr with {STATE_JSON}) under {CHECKPOINT_DIR}/: nothing to "
            "resume; run the same command without --resume, with --out this folder, to start it again",
        )
    return found[-1][1]


def complete_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint (its .state.json written) in RUN_DIR/checkpoints, oldest first."""
    found = []
    for candidate in (Path(run_dir) / CHECKPOINT_DIR).glob("step-*.apr"):
        match = _STEP_FILE.match(candidate.name)
        if match and state_paths(candidate)[0].exists():
            found.append((int(match.group(1)), candidate))
    return sorted(found)


def run_dir_of(ckpt: str | os.PathLike) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/step-N.apr (the checkpoint's folder otherwise)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, names: Mapping[torch.nn.Parameter, str]
) -> dict[str, torch.Tensor]:
    """Per-parameter optimizer state keyed `optim.<param name>.<field>` (names, not positions)."""
    out = {}
    for param, fields in optimizer.state.items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{names[param]}.{field}"] = value
    return out


def restore_optimizer(
    optimizer: torch.optim.Optimizer, names: Mapping[torch.nn.Parameter, str], tensors: Mapping[str, Any],
    source: str | os.PathLike, place: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
) -> int:
    """Load per-parameter state saved by `optimizer_tensors`; returns the number of parameters restored.

    Hyperparameters come from the fresh optimizer (they follow the run's config). A saved field
    shaped like its parameter goes through `place(param, stored)` (e.g. `Parallel.place`, which
    reads only this rank's rows of a sharded parameter); other fields (AdamW's step) are read whole.

    Raises:
        CorruptSource: a parameter has no saved state, or the state names a parameter we do not have.
    """
    state = optimizer.state_dict()
    index, params = {}, {}
    for group, saved_group in zip(optimizer.param_groups, state["param_groups"], strict=True):
        for p, i in zip(group["params"], saved_group["params"], strict=True):
            index[names[p]], params[names[p]] = i, p
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key in tensors:
        if not key.startswith("optim."):
            continue
        name, field = key[len("optim."):].rsplit(".", 1)
        if name not in index:
            raise CorruptSource(source, f"optimizer state for unknown parameter {name!r}")
        stored, param = tensors[key], params[name]
        shaped = place is not None and tuple(stored.shape) == tuple(param.shape)
        restored.setdefault(index[name], {})[field] = place(param, stored) if shaped else stored[...]
    missing = sorted(set(index) - {n for n, i in index.items() if i in restored})
    if restored and missing:
        raise CorruptSource(source, f"optimizer state lacks {len(missing)} parameters, e.g. {missing[0]!r}")
    state["state"] = restored
    optimizer.load_state_dict(state)
    return len(restored)


def rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch RNG states of this process (CPU, and the CUDA device in use)."""
    out = {"rng.torch": torch.get_rng_state()}
    if device.type == "cuda":
        out["rng.cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(tensors: Mapping[str, Any], device: torch.device) -> None:
    """Put back RNG states saved by `rng_tensors` (CUDA only when both sides used CUDA)."""
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"][...].to(torch.uint8))
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"][...].to(torch.uint8), device)


def publish_final(checkpoint: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """RUN_DIR/final.apr: the last checkpoint's weights (hard link, or a copy), replaced atomically."""
    final = Path(run_dir) / FINAL_NAME
    try:
        link_into_place(checkpoint, final)
    except OSError:  # a file system without hard links
        with replacing(final) as out, open(checkpoint, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    return final


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    with replacing(path) as out:
        out.write(text.encode("utf-8"))


def flags_for(metadata: Mapping[str, Any]) -> int:
    """HAS_VOCAB when the metadata carries a tokenizer (spec: "Tokenizer")."""
    has_vocab = "tokenizer.vocabulary" in metadata or carried_tokenizer_text(metadata) is not None
    return int(Flag.HAS_VOCAB) if has_vocab else 0


class Checkpointer:
    """Saves a run's checkpoints (every rank gathers, the main rank writes) and restores a resumed one.

    It is handed the stateful parts: the wrapped model, the optimizer, and what the files describe
    (the source's metadata, the config record, the data split).
    """

    def __init__(self, run_dir: Path, ctx: DistContext, par: Parallel, optimizer: torch.optim.Optimizer,
                 precision: Precision, config: TrainConfig, config_record: Mapping[str, Any], source: ModelSource,
                 dataset: TokenDataset, log: Callable[[str], None]) -> None:
        self.run_dir, self.ctx, self.par, self.optimizer, self.precision = run_dir, ctx, par, optimizer, precision
        self.config, self.config_record, self.source = config, config_record, source
        self.dataset, self.log = dataset, log
        self.names = {p: n for n, p in par.module.named_parameters()}
        self.replicas: list[str] | None = None

    def restore(self, tensors: Mapping[str, Any]) -> None:
        """Put back optimizer moments (this rank's rows of each) and RNG states from a checkpoint's state
        (its fp32 master weights, if any, were loaded with the model: `inputs.build_model`)."""
        restore_optimizer(self.optimizer, self.names, tensors, self.config.resume or "", place=self.par.place)
        restore_rng(tensors, self.ctx.device)

    def save(self, state: TrainState, last: bool) -> Path:
        """Write RUN_DIR/checkpoints/step-N.apr and its state (collective); the last one checks DDP replicas.

        The files are those of a single-process run whatever the strategy: the main rank writes them
        while every rank takes part in gathering one tensor at a time (sharded ones), so its extra
        memory is about the largest tensor.
        """
        if last:
            self.replicas = self.par.replica_digests()
            if self.replicas is not None:
                self.log(f"replicas: all {len(self.replicas)} ranks hold identical weights "
                         f"(sha256 {self.replicas[0][:16]}...)")
        params = dict(self.par.module.named_parameters())
        path = checkpoint_path(self.run_dir, state.step)
        guards.refuse_nonfinite(self.ctx, params.items(), DTYPE_BY_NAME[self.precision.save].to_torch(), path)
        tensors = {**optimizer_tensors(self.optimizer, self.names), **rng_tensors(self.ctx.device)}
        if self.precision.saves_rounded:  # the .apr holds rounded weights; resuming needs the exact ones
            tensors.update({MASTER_PREFIX + name: p for name, p in params.items()})
        write = partial(self._write, path, state, params, tensors, self.replicas if last else None)
        distributed.gather_on_main(self.ctx, {**params, **tensors}, self.par.gather, write)
        return path

    def publish_final(self, last: Path) -> Path | None:
        """RUN_DIR/final.apr from the last checkpoint (main rank; None elsewhere)."""
        return distributed.run_on_main(self.ctx, lambda: publish_final(last, self.run_dir))

    def _write(self, path: Path, state: TrainState, params: Mapping[str, torch.Tensor],
               tensors: Mapping[str, torch.Tensor], replicas: list[str] | None,
               fetch: Callable[[str], torch.Tensor]) -> None:
        val = state.val_loss if state.val_step == state.step else None
        config, save = self.config, self.precision.save
        training = {"step": state.step, "tokens_seen": state.tokens_seen, "loss": state.loss, "val_loss": val,
                    "skipped_steps": state.skipped_steps, "seed": config.seed, "lineage": self._lineage()}
        meta = self._metadata(training)
        save_weights(path, params, meta, dtype=save, tied=self.source.arch.tie_word_embeddings,
                     flags=flags_for(meta), fetch=fetch)
        split = self.dataset.split
        scalars = {
            "step": state.step, "tokens_seen": state.tokens_seen, "loss": state.loss, "val_loss": val,
            "skipped_steps": state.skipped_steps, "config": dict(self.config_record), "save_dtype": save,
            "world_size": self.ctx.world_size, "strategy": self.par.strategy, "precision": self.precision.name,
            "schedule": schedule_record(config, state.step),
            "data": {"source": self.dataset.stream.source, "num_tokens": len(self.dataset.stream),
                     "n_train": split.n_train, "n_val": split.n_val, "sampler": SAMPLER, "next_step": state.step},
            "replica_sha256": replicas,
        }
        save_state(path, scalars, tensors, fetch=fetch)

    def _lineage(self) -> dict[str, Any]:
        """Where the weights came from (absolute paths): the --init file and what it was made from, or
        the architecture of a random init; a resumed run keeps its checkpoint's lineage."""
        inherited = self.source.metadata
        earlier = inherited.get("training") if isinstance(inherited.get("training"), dict) else {}
        if self.config.resume and isinstance(earlier.get("lineage"), dict):
            return earlier["lineage"]
        if self.source.weights is None:
            return {"init": None, "architecture": self.source.label}
        lineage = {"init": os.path.abspath(self.source.weights), "init_step": earlier.get("step")}
        lineage.update({f"init_{key}": inherited.get(key) for key in LINEAGE_KEYS})
        return lineage

    def _metadata(self, training: dict[str, Any]) -> dict[str, Any]:
        """The input's metadata (tokenizer keys included) plus `training`; one spelling of the tie flag.

        aprender writes `tied_embeddings` (spec: "Tied embeddings"); the HF spelling is dropped so
        the file never carries both. The checkpoint gets its own `created_at`; the input's
        `source`, `original_format` and `created_at` move under `training.lineage`.
        """
        dropped = ("training", "tie_word_embeddings", *LINEAGE_KEYS)
        meta = {k: v for k, v in self.source.metadata.items() if k not in dropped}
        meta["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        meta["tied_embeddings"] = self.source.arch.tie_word_embeddings
        if self.config.tokenizer is not None and carried_tokenizer_text(meta) is None:
            files = dict(meta.get(HF_FILES_KEY) or {})
            files[TOKENIZER_KEY] = Path(self.config.tokenizer).read_text(encoding="utf-8")
            meta[HF_FILES_KEY] = files
        meta["training"] = training
        return meta
