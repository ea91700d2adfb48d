"""Tokenizers for training: loading (from an .apr or a tokenizer.json), batched encoding of text pieces, vocab checks."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_format import open_apr
from apr_format.errors import CorruptSource, InvalidArgument, VocabMismatch

from .corpus import Piece, safe_cut

# The source's tokenizer.json text: converters carry it as `hf_files["tokenizer.json"]`; a
# top-level "tokenizer.json" key is read too.
TOKENIZER_KEY = "tokenizer.json"
HF_FILES_KEY = "hf_files"
TOKENIZER_CONFIG = "tokenizer_config.json"  # names the eos token (HF convention)
# Tried in order when neither the .apr nor the caller names the end-of-document token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer plus what the trainer needs to know about it."""

    tokenizer: Any  # tokenizers.Tokenizer
    source: str  # the file it came from
    size: int  # ids it can produce: len incl. added/special tokens (and max id + 1)
    added: int  # how many of them are added/special tokens
    eos_id: int | None  # appended after each document, None when unknown
    sha256: str  # of the tokenizer.json text, to tell tokenizers apart


def load_tokenizer(
    tokenizer_file: str | os.PathLike | None = None,
    apr_path: str | os.PathLike | None = None,
    apr_metadata: Mapping[str, Any] | None = None,
) -> TokenizerInfo:
    """The tokenizer given by `tokenizer_file`, else the one carried in the .apr's metadata
    (`apr_metadata`, read from `apr_path` when not given).

    Raises:
        InvalidArgument: neither source has a usable tokenizer.
        CorruptSource: the tokenizer.json cannot be parsed.
    """
    if tokenizer_file is not None:
        path = os.fspath(tokenizer_file)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except UnicodeDecodeError:
            raise CorruptSource(path, "is not UTF-8 text, so not a tokenizer.json") from None
        sibling = Path(path).with_name(TOKENIZER_CONFIG)
        config = sibling.read_text(encoding="utf-8") if sibling.is_file() else None
        return _from_json_text(text, path, {HF_FILES_KEY: {TOKENIZER_CONFIG: config}} if config else None)
    if apr_metadata is None and apr_path is not None:
        with open_apr(apr_path, use_mmap=False) as f:
            apr_metadata = f.metadata
    meta = dict(apr_metadata or {})
    where = os.fspath(apr_path) if apr_path is not None else "model"
    carried = carried_tokenizer_text(meta)
    if carried is not None:
        return _from_json_text(carried, f"{where} [{TOKENIZER_KEY}]", meta)
    if "tokenizer.vocabulary" in meta:
        raise InvalidArgument(
            where,
            "carries aprender's tokenizer.vocabulary/merges but not the original tokenizer.json; "
            "pass --tokenizer tokenizer.json (rebuilding the pre-tokenizer from vocabulary and merges "
            "would tokenize differently from the model's own tokenizer)",
        )
    raise InvalidArgument(
        where, "carries no tokenizer; pass --tokenizer tokenizer.json or tokenize with `apr tokenize`"
    )


def carried_tokenizer_text(meta: Mapping[str, Any]) -> str | None:
    """The tokenizer.json text an .apr's metadata carries, or None."""
    files = meta.get(HF_FILES_KEY)
    for carried in (files.get(TOKENIZER_KEY) if isinstance(files, Mapping) else None, meta.get(TOKENIZER_KEY)):
        if isinstance(carried, str):
            return carried
        if isinstance(carried, Mapping):
            return json.dumps(carried)
    return None


def _from_json_text(text: str, source: str, meta: Mapping[str, Any] | None) -> TokenizerInfo:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the tokenizers library raises a bare Exception for bad JSON
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise CorruptSource(source, f"not a valid tokenizer.json ({first})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    added = size - tokenizer.get_vocab_size(with_added_tokens=False)
    return TokenizerInfo(
        tokenizer=tokenizer, source=source, size=size, added=max(added, 0),
        eos_id=_eos_id(tokenizer, meta), sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


def _eos_id(tokenizer: Any, meta: Mapping[str, Any] | None) -> int | None:
    """The model's end-of-sequence id: aprender's key, tokenizer_config.json, special_tokens, usual names."""
    meta = meta or {}
    if isinstance(meta.get("tokenizer.eos_token_id"), int):
        return meta["tokenizer.eos_token_id"]
    named = []
    files = meta.get(HF_FILES_KEY)
    config_text = files.get(TOKENIZER_CONFIG) if isinstance(files, Mapping) else None
    if isinstance(config_text, str):
        try:
            eos = json.loads(config_text).get("eos_token")
        except (ValueError, AttributeError):
            eos = None
        named.append(eos.get("content") if isinstance(eos, dict) else eos)
    special = meta.get("special_tokens")
    named.append(special.get("eos_token") if isinstance(special, dict) else None)
    for token in [t for t in named if isinstance(t, str)] + list(_EOS_CANDIDATES):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


# Text in one encode_batch call: enough pieces for every core, a bounded number of Encodings alive.
BATCH_CHARS = 1 << 21
# Lines a newline cut must not change: words, numbers, punctuation, CJK, emoji, contractions, indentation.
_CUT_PROBE = (
    "The miller's cat slept.\nIt was 1234567 days\n(or so) -- \"quoted\"\n\u65e5\u672c\u8a9e\u306e\u6587\n"
    "emoji \U0001f642 here\n'tis 3.14\n\tcode = x[0]\nend.\n\nNew para\n  indented\nlast"
)


@dataclass(frozen=True)
class EncodedBatch:
    """Token ids of consecutive pieces, back to back; `lengths[i]` ids belong to `pieces[i]`
    (the end-of-document id included after a document's last piece)."""

    pieces: list[Piece]
    ids: np.ndarray  # int64
    lengths: np.ndarray  # int64


def eos_note(info: TokenizerInfo) -> str:
    """The log line saying what ends each document."""
    if info.eos_id is None:
        return f"documents: joined WITHOUT a separator ({info.source} has no end-of-text token)"
    token = info.tokenizer.id_to_token(info.eos_id)
    return f"documents: each ends with {token} (id {info.eos_id}); no BOS or template tokens are added"


def cuts_at_newlines(info: TokenizerInfo) -> bool:
    """Whether cutting text after a newline between two non-space characters leaves its ids unchanged.

    True for the byte-level BPE pre-tokenizers of GPT-2, Qwen and Llama 3; False e.g. for a prefix
    space added to every input, or SentencePiece-style normalizers that see the whole text.
    """
    tokenizer, text, parts = info.tokenizer, _CUT_PROBE, []
    while cut := safe_cut(text, 1, len(text)):
        parts.append(text[:cut])
        text = text[cut:]
    parts.append(text)
    whole = tokenizer.encode(_CUT_PROBE, add_special_tokens=False).ids
    pieces = [i for enc in tokenizer.encode_batch(parts, add_special_tokens=False) for i in enc.ids]
    return len(parts) > 4 and whole == pieces


def encode_pieces(info: TokenizerInfo, pieces: Iterable[Piece]) -> Iterator[EncodedBatch]:
    """Encode pieces with the tokenizer's parallel `encode_batch_fast` (all cores), the end-of-text id
    after every document (when the tokenizer has one). No BOS/special tokens are added by the
    post-processor: documents are separated by EOS only (the nanoGPT convention).
    """
    pending: list[Piece] = []
    size = 0
    for piece in pieces:
        pending.append(piece)
        size += len(piece.text)
        if size >= BATCH_CHARS:
            yield _encode(info, pending)
            pending, size = [], 0
    if pending:
        yield _encode(info, pending)


def _encode(info: TokenizerInfo, pieces: list[Piece]) -> EncodedBatch:
    encodings = info.tokenizer.encode_batch_fast([p.text for p in pieces], add_special_tokens=False)
    eos = info.eos_id
    lengths = np.empty(len(pieces), dtype=np.int64)
    ids: list[int] = []
    for k, (piece, enc) in enumerate(zip(pieces, encodings, strict=True)):
        ids += enc.ids
        if piece.ends_document and eos is not None:
            ids.append(eos)
        lengths[k] = len(enc.ids) + (piece.ends_document and eos is not None)
    return EncodedBatch(pieces, np.array(ids, dtype=np.int64), lengths)


def check_vocab(
    model_rows: int, *, where: str, tokenizer: TokenizerInfo | None = None, declared: int | None = None,
    max_id: int | None = None, exact: int | None = None,
) -> None:
    """Check that token ids fit the model's embedding rows (spec: aprender's training defaults).

    `exact` (random init of llama-370m) requires the tokenizer / declared vocabulary to be exactly
    that size; otherwise they must be <= `model_rows`. The largest id must be < `model_rows`.

    Raises:
        VocabMismatch: with both numbers.
    """
    sizes = []
    if tokenizer is not None:
        what = f"tokenizer {tokenizer.source} has {tokenizer.size} tokens (incl. {tokenizer.added} added/special)"
        sizes.append((what, tokenizer.size))
    if declared is not None:
        sizes.append((f"token file declares vocab_size {declared}", declared))
    for what, size in sizes:
        if exact is not None and size != exact:
            raise VocabMismatch(
                where, f"{what} but the architecture's vocabulary is {exact}; without --init the tokenizer "
                f"size must equal it exactly (use --init with a model of this vocabulary, or --arch-config)",
            )
        if size > model_rows:
            raise VocabMismatch(
                where, f"{what} but the model has only {model_rows} embedding rows (need tokenizer size <= rows)"
            )
    if max_id is not None and max_id >= model_rows:
        raise VocabMismatch(
            where, f"token id {max_id} appears in the data but the model has only {model_rows} embedding rows"
        )
