"""Tokenizers for training: loading (from an .apr or a tokenizer.json), text -> token ids, vocab checks."""

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

# The source's tokenizer.json text: converters carry it as `hf_files["tokenizer.json"]`; a
# top-level "tokenizer.json" key is read too.
TOKENIZER_KEY = "tokenizer.json"
HF_FILES_KEY = "hf_files"
TOKENIZER_CONFIG = "tokenizer_config.json"  # names the eos token (HF convention)
TEXT_SUFFIXES = (".txt", ".jsonl")
# Text is encoded in pieces of about this many characters (bounded memory on big corpora).
CHUNK_CHARS = 1 << 20
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


def text_files(path: str | os.PathLike) -> list[Path]:
    """The text files `path` stands for: itself, or every .txt/.jsonl below a folder (sorted).

    Raises:
        InvalidArgument: a folder without any .txt/.jsonl file.
    """
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise InvalidArgument(root, "folder holds no .txt or .jsonl files")
        return files
    return [root]


def iter_documents(files: Iterable[Path]) -> Iterator[Iterator[str]]:
    """Each document as a stream of text pieces: a .txt file is one document, a .jsonl line is one.

    Raises:
        CorruptSource: a .jsonl line that is not a JSON object with a string "text" field.
    """
    for file in files:
        if file.suffix == ".jsonl":
            yield from _utf8(file, _jsonl_documents(file))
        else:
            yield _utf8(file, _text_pieces(file))


def _utf8(file: Path, items: Iterator[Any]) -> Iterator[Any]:
    """`items`, with a decoding failure reported as the file's one-line error."""
    try:
        yield from items
    except UnicodeDecodeError as exc:
        raise CorruptSource(file, f"is not UTF-8 text ({exc.reason} at byte {exc.start} of a read block)") from None


def _jsonl_documents(file: Path) -> Iterator[Iterator[str]]:
    with open(file, encoding="utf-8", newline="") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise CorruptSource(file, f"line {number} is not valid JSON") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise CorruptSource(file, f'line {number} has no string "text" field')
            yield iter((text,))


def _text_pieces(file: Path) -> Iterator[str]:
    """Read a text file in ~CHUNK_CHARS pieces, cut only inside "X\nY" (X, Y not whitespace).

    Byte-level BPE pre-tokenizers (GPT-2, Qwen, Llama 3) never join such a newline with the
    word after it, so encoding the pieces separately gives the ids of the whole file.
    """
    with open(file, encoding="utf-8", newline="") as fh:  # newline="": "\r\n" stays as written
        carry = ""
        while True:
            block = fh.read(CHUNK_CHARS)
            text = carry + block
            if not block:
                if text:
                    yield text
                return
            cut = _cut_point(text)
            if cut:
                yield text[:cut]
            carry = text[cut:]


def _cut_point(text: str) -> int:
    """The last position just after a newline with non-whitespace on both sides (0: none)."""
    pos = len(text) - 1
    while True:
        pos = text.rfind("\n", 1, pos)
        if pos < 0:
            return 0
        if not text[pos - 1].isspace() and not text[pos + 1].isspace():
            return pos + 1


def encode_documents(
    info: TokenizerInfo, documents: Iterable[Iterator[str]], batch: int = 64
) -> Iterator[np.ndarray]:
    """Token ids (int64 arrays) of each piece of each document; the EOS id follows every document.

    No BOS/special tokens are added by the tokenizer's post-processor: documents are separated
    by EOS only (the nanoGPT convention), so the stream is the same whatever the template.
    """
    eos = np.array([info.eos_id], dtype=np.int64) if info.eos_id is not None else None
    pending: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        encodings = info.tokenizer.encode_batch(pending, add_special_tokens=False)
        pending.clear()
        for enc in encodings:
            yield np.asarray(enc.ids, dtype=np.int64)

    for document in documents:
        for piece in document:
            pending.append(piece)
            if len(pending) >= batch:
                yield from flush()
        if pending:
            yield from flush()
        if eos is not None:
            yield eos


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
