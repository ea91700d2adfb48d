"""What a run starts from: the weights (--init / --resume / preset), tokenizer and vocabulary checks, the data."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apr_format import open_apr
from apr_format.architecture import ArchitectureConfig, read_architecture
from apr_format.errors import CorruptSource, InvalidArgument
from apr_format.init_tensors import UnusedTensorWarning, expected_parameter_shapes, load_init_tensors

from .checkpoint import MASTER_PREFIX, STATE_TENSORS
from .config import TrainConfig
from .data import TokenDataset, TokenStream, open_tokens
from .model import DecoderLM
from .presets import DEFAULT_PRESET, load_arch_config, preset
from .tokenization import TokenizerInfo, carried_tokenizer_text, check_vocab, load_tokenizer

Log = Callable[[str], None]


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: its architecture, weights file (None = random) and metadata."""

    arch: ArchitectureConfig
    weights: str | None
    metadata: dict[str, Any]
    label: str  # how the log names it
    exact_vocab: int | None  # spec: without --init the tokenizer must match llama-370m's exactly

    @property
    def start_label(self) -> str:
        """How the step-0 log line names the starting weights."""
        return f"RANDOM INIT ({self.label})" if self.weights is None else f"weights from {self.weights}"

    def describe(self) -> str:
        """The log line stating the architecture."""
        arch = self.arch
        return (f"architecture: {arch.family} from {self.label}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
                f"{arch.num_heads} heads / {arch.num_kv_heads} kv heads, vocab {arch.vocab_size}, "
                f"{'tied' if arch.tie_word_embeddings else 'untied'} embeddings")


def model_source(config: TrainConfig, resume_ckpt: Path | None) -> ModelSource:
    """The resumed checkpoint, the --init file, the --arch-config file or a preset, in that order."""
    if resume_ckpt is not None:
        with open_apr(resume_ckpt) as f:
            meta = dict(f.metadata)  # its `training` carries the run's lineage on
        exact = _exact_vocab(config)
        return ModelSource(read_architecture(resume_ckpt), os.fspath(resume_ckpt), meta, os.fspath(resume_ckpt), exact)
    if config.init is not None:
        with open_apr(config.init) as f:
            meta = dict(f.metadata)
        return ModelSource(read_architecture(config.init), config.init, meta, config.init, None)
    if config.arch_config is not None:
        arch, label = load_arch_config(config.arch_config), f"--arch-config {config.arch_config}"
    else:
        name = config.arch or DEFAULT_PRESET
        arch, label = preset(name), f"preset {name}"
    meta = {**arch.to_metadata(), "param_count": arch.param_count()}
    return ModelSource(arch, None, meta, label, _exact_vocab(config))


def _exact_vocab(config: TrainConfig) -> int | None:
    """Spec: without --init, the tokenizer size must equal the default architecture's vocabulary."""
    if config.init is None and config.arch_config is None and (config.arch or DEFAULT_PRESET) == DEFAULT_PRESET:
        return preset(DEFAULT_PRESET).vocab_size
    return None


def load_data(config: TrainConfig, source: ModelSource) -> tuple[TokenDataset, list[str]]:
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
    notes = [*stream.notes, _data_note(stream, max_id, rows, loaded[0] if loaded else None)]
    notes += _tokenizer_mismatches(config, source, stream, loaded[0] if config.tokenizer is not None else None)
    source.arch.check_sequence_length(config.seq_len, flag="--seq-len")
    dataset = TokenDataset(stream, config.seq_len, config.val_fraction)
    split = dataset.split
    notes.append(f"split: {split.n_train:,} training tokens, last {split.n_val:,} held out for validation")
    notes += dataset.size_warnings(config.batch_size * config.grad_accum, config.val_batches * config.batch_size)
    if config.seq_len > source.arch.max_position_embeddings:
        notes.append(f"warning: --seq-len {config.seq_len} exceeds max_position_embeddings "
                     f"{source.arch.max_position_embeddings} of the architecture")
    return dataset, notes


def _tokenizer_mismatches(config: TrainConfig, source: ModelSource, stream: TokenStream,
                          given: TokenizerInfo | None) -> list[str]:
    """Warnings for a tokenizer that is not the one carried in the weights' file (--tokenizer, or the
    one a .bin was made with); --strict refuses instead.

    Raises:
        InvalidArgument: under --strict, naming the flag or file that disagrees.
    """
    carried = carried_tokenizer_text(source.metadata)
    if source.weights is None:
        return []
    if carried is None:
        return [f"note: {source.label} carries no tokenizer, so the tokenizer of the data cannot be checked "
                "against the model's"] if given is not None else []
    found = []
    if given is not None and given.sha256 != _sha256(carried):
        found.append((None, f"{given.source} is not the tokenizer carried in {source.label}: "
                                     "its ids may mean other tokens to this model"))
    made_with = stream.info.tokenizer_sha256 if stream.info else None
    if made_with and made_with != _sha256(carried):
        found.append((stream.source, f"was tokenized with a different tokenizer than the one in {source.label}"))
    if found and config.strict:
        where, problem = found[0]
        flag = "--tokenizer" if where is None else None
        raise InvalidArgument(where, f"{problem} (--strict; drop --strict to train anyway)", flag=flag)
    return [f"warning: {where or '--tokenizer'}: {problem} (--strict refuses this)" for where, problem in found]


def _data_note(stream: TokenStream, max_id: int, rows: int, tok: TokenizerInfo | None) -> str:
    what = f"data: {stream.source}: {len(stream):,} tokens, max id {max_id} < {rows} rows"
    if tok is not None:
        what += f"; tokenizer {tok.source}: {tok.size} tokens <= {rows} rows"
    if stream.info is not None and stream.info.vocab_size is not None:
        what += f"; declared vocab_size {stream.info.vocab_size}"
    return what


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class ModelWeights:
    """A model on the meta device and, for each parameter, a whole tensor to read its rows from:
    tensors of the .apr read on demand (in the file's dtype), or the fp32 master weights
    saved beside a resumed checkpoint. `parallel.wrap` gives each rank only the rows it holds."""

    model: DecoderLM
    sources: Mapping[str, Any]
    note: str  # the log line saying where the weights came from
    source_dtype: str  # the stored float dtype (checkpoints keep it by default)


def build_model(config: TrainConfig, source: ModelSource, saved: Mapping[str, Any], log: Log) -> ModelWeights:
    """The meta-device model of `source` and where each parameter's values come from.

    `saved`: a resumed checkpoint's state tensors; its fp32 masters (when it has them) are read
    instead of the rounded weights of the .apr. Random init builds the model once in memory.
    """
    torch.manual_seed(config.seed)
    with torch.device("meta"):
        model = DecoderLM(source.arch)
    if source.weights is None:
        note = (f"RANDOM INIT of {source.label} (seed {config.seed}) -- no --init given, "
                "this model starts from scratch")
        return ModelWeights(model, DecoderLM(source.arch).state_dict(), note, "f32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnusedTensorWarning)
        tensors = load_init_tensors(source.weights, source.arch, on_demand=True)  # each rank reads its own rows
    for warning in caught:
        if issubclass(warning.category, UnusedTensorWarning):
            log(f"warning: {warning.message}")
    expected = expected_parameter_shapes(source.arch)
    masters = {name: saved[MASTER_PREFIX + name] for name in tensors if MASTER_PREFIX + name in saved}
    if masters and len(masters) != len(tensors):
        missing = sorted(set(tensors) - set(masters))
        raise CorruptSource(source.weights, f"its {STATE_TENSORS} sidecar lacks fp32 master weights for "
                                            f"{len(missing)} parameter(s), e.g. {missing[0]!r}")
    # wrap() loads strictly: a parameter missing here fails there, so nothing can stay random.
    note = f"loaded {len(tensors)}/{len(expected)} tensors from {source.weights}"
    if tensors.dropped_tied_head:
        note += " (its lm_head.weight is the tied copy of the embedding, checked byte for byte)"
    if masters:
        note += f"; fp32 master weights from {STATE_TENSORS} sidecar"
    stored = tensors.source_dtypes.get("model.embed_tokens.weight", "f32")
    return ModelWeights(model, {**tensors, **masters}, note, stored)
