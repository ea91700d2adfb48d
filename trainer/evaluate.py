"""Perplexity of a causal LM over a token stream: non-overlapping windows, mean next-token cross-entropy."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from apr_format.errors import InvalidArgument

from .data import TokenStream, open_tokens
from .model import DecoderLM
from .tokenization import TokenizerInfo, check_vocab


@dataclass(frozen=True)
class Perplexity:
    """exp(loss), the loss in nats, predicted tokens (windows x (seq_len - 1)), windows, seq_len."""

    perplexity: float
    loss: float
    tokens: int
    windows: int
    seq_len: int


def eval_tokens(
    data: str | os.PathLike, tokenizer: Callable[[], TokenizerInfo], *, vocab_rows: int, where: str
) -> TokenStream:
    """The token stream of `data`: a token file (or folder of them) as stored, or text tokenized
    with `tokenizer()` WITHOUT any special token (no BOS, no EOS between documents).

    Raises:
        What `open_tokens` and `tokenizer` raise; VocabMismatch when an id does not fit `vocab_rows`.
    """
    def plain() -> TokenizerInfo:
        return dataclasses.replace(tokenizer(), eos_id=None)

    stream = open_tokens(data, plain)
    check_vocab(vocab_rows, where=where, max_id=stream.max_id())
    return stream


@torch.no_grad()
def perplexity(
    model: DecoderLM, stream: TokenStream, *, seq_len: int, batch_size: int = 8, max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Perplexity of `model` on the first `max_tokens` ids of `stream` (all when None).

    The ids are cut into consecutive windows of `seq_len` (the last partial window is dropped);
    each window predicts its ids 2..seq_len from their prefixes; loss is the mean cross-entropy
    (float32 logits, float64 sum) over every predicted id; perplexity = exp(loss). `progress`
    is called with (windows done, windows).

    Raises:
        InvalidArgument: seq_len < 2 or beyond the model's context, batch_size < 1, max_tokens < 1,
            or fewer than seq_len ids.
    """
    context = model.config.max_position_embeddings
    if not 2 <= seq_len <= context:
        raise InvalidArgument("--seq-len", f"must be between 2 and the model's context of {context}, got {seq_len}")
    if batch_size < 1:
        raise InvalidArgument("--batch-size", f"must be at least 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise InvalidArgument("--max-tokens", f"must be at least 1, got {max_tokens}")
    available = len(stream) if max_tokens is None else min(len(stream), max_tokens)
    windows = available // seq_len
    if windows == 0:
        raise InvalidArgument(
            stream.source, f"has {available} tokens{' (--max-tokens)' if max_tokens else ''}, "
            f"fewer than one window of --seq-len {seq_len}",
        )
    device = model.head_weight.device
    total = 0.0
    for first in range(0, windows, batch_size):
        count = min(batch_size, windows - first)
        ids = stream.slice(first * seq_len, (first + count) * seq_len).reshape(count, seq_len)
        batch = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(device)
        mean = model(batch[:, :-1], batch[:, 1:])
        total += float(mean.double()) * count * (seq_len - 1)
        if progress is not None:
            progress(first + count, windows)
    predicted = windows * (seq_len - 1)
    loss = total / predicted
    return Perplexity(perplexity=math.exp(loss), loss=loss, tokens=predicted, windows=windows, seq_len=seq_len)
