"""A model and its tokenizer loaded from an .apr for evaluation and generation (no training state)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from apr_format import open_apr
from apr_format.errors import InvalidArgument
from apr_format.init_tensors import UnusedTensorWarning

from .distributed import resolve_device
from .model import DecoderLM
from .tokenization import HF_FILES_KEY, TokenizerInfo, check_vocab, load_tokenizer

COMPUTE_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class LoadedModel:
    """An evaluation-mode DecoderLM with the metadata of the .apr it came from."""

    model: DecoderLM
    metadata: Mapping[str, Any]
    path: str
    label: str  # what the user named (a folder, a GGUF, an hf:// id): used in messages

    @property
    def context_length(self) -> int:
        """The longest sequence the model was built for (max_position_embeddings)."""
        return self.model.config.max_position_embeddings

    def tokenizer(self, tokenizer_file: str | os.PathLike | None = None) -> TokenizerInfo:
        """`tokenizer_file`, else the tokenizer carried in the checkpoint, checked against the embedding rows.

        Raises:
            InvalidArgument: no tokenizer in the checkpoint (the message names --tokenizer).
            CorruptSource, VocabMismatch.
        """
        info = load_tokenizer(tokenizer_file, apr_metadata=self.metadata, apr_path=self.label)
        check_vocab(self.model.config.vocab_size, where=self.label, tokenizer=info)
        return info

    def eos_ids(self, tokenizer: TokenizerInfo) -> frozenset[int]:
        """The tokenizer's EOS plus the eos_token_id(s) of the carried generation_config.json (as transformers stops)."""
        ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
        files = self.metadata.get(HF_FILES_KEY)
        text = files.get(GENERATION_CONFIG) if isinstance(files, Mapping) else None
        try:
            declared = json.loads(text).get("eos_token_id") if isinstance(text, str) else None
        except (ValueError, AttributeError):
            declared = None
        for value in declared if isinstance(declared, list) else [declared]:
            if isinstance(value, int) and not isinstance(value, bool):
                ids.add(value)
        return frozenset(ids)


def load_model(
    apr_path: str | os.PathLike, *, device: str = "auto", dtype: str = "auto", label: str | None = None,
    warn: Callable[[str], None] = lambda _: None,
) -> LoadedModel:
    """The model of the .apr at `apr_path` on `device` (auto | cpu | cuda), in eval mode.

    `dtype` auto computes in float32 on CPU (exact; bf16/f16 weights are widened losslessly) and
    in the checkpoint's own float dtype on CUDA; f32 / bf16 / f16 force one. Tensors the model
    does not use are reported through `warn`.

    Raises:
        InvalidArgument: unknown dtype or device; what DecoderLM.from_apr raises (an encoder
        family is UnsupportedArchitecture).
    """
    if dtype != "auto" and dtype not in COMPUTE_DTYPES:
        raise InvalidArgument("--dtype", f"unknown dtype {dtype!r} (choose auto, {', '.join(COMPUTE_DTYPES)})")
    target = resolve_device(device)
    torch_dtype = COMPUTE_DTYPES.get(dtype)
    if dtype == "auto" and target.type == "cpu":
        torch_dtype = torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnusedTensorWarning)
        model = DecoderLM.from_apr(apr_path, dtype=torch_dtype, device=target)
    path, label = os.fspath(apr_path), label or os.fspath(apr_path)
    for warning in caught:
        if issubclass(warning.category, UnusedTensorWarning):
            warn(str(warning.message).replace(path, label))
    with open_apr(path) as f:
        metadata = f.metadata
    return LoadedModel(model=model.eval(), metadata=metadata, path=path, label=label)
