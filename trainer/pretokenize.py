"""`apr tokenize`'s pipeline: input files -> pieces -> parallel encode_batch -> fixed-size token shards and
an index, resumable from the last complete shard."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apr_format.atomic import claim_folder, replacing_folder
from apr_format.errors import CorruptSource, InvalidArgument, OutputExists

from .corpus import Inputs, Piece, ReadOptions, find_inputs, input_notes, kind_of, read_pieces
from .shards import (
    INDEX_FORMAT,
    INDEX_NAME,
    JOB_NAME,
    Progress,
    ResumePoint,
    ShardWriter,
    complete_shards,
    job_sha256,
    read_index,
    shard_name,
    sidecar_path,
    token_dtype,
    write_json,
)
from .tokenization import EncodedBatch, TokenizerInfo, cuts_at_newlines, encode_pieces, eos_note

_HASH_BLOCK = 1 << 22


@dataclass(frozen=True)
class TokenizeOptions:
    """How `apr tokenize` reads documents and cuts shards."""

    text_field: str = "text"
    doc_separator: str | None = None
    split_paragraphs: bool = False
    no_separator: bool = False  # accept a tokenizer without an end-of-text token
    shard_tokens: int = 100_000_000
    prefix: str = "tokens"
    dtype: str = "auto"


def tokenize_corpus(
    specs: list[str | os.PathLike], out: str | os.PathLike, tokenizer: TokenizerInfo, options: TokenizeOptions,
    *, resume: bool = False, force: bool = False, log: Callable[[str], None] = lambda line: None,
    on_batch: Callable[[EncodedBatch, float], None] | None = None,
) -> dict[str, Any]:
    """Tokenize every input into shards `out/PREFIX-00000.bin` (+ sidecars) and `out/index.json`.

    Returns the index. `on_batch` sees each encoded batch and about what share of the input bytes is
    done (progress display).

    Raises:
        InvalidArgument: bad options, unusable inputs, an existing output without --force/--resume,
            a tokenizer without end-of-text token (unless `no_separator`).
        OutputExists: `out` holds something else and neither `resume` nor `force` is given.
        CorruptSource: unreadable text, or inputs holding no tokens.
    """
    folder = Path(out)
    _check_options(options, folder)
    if tokenizer.eos_id is None and not options.no_separator:
        raise InvalidArgument(tokenizer.source, "has no end-of-text token, so documents would run together; "
                                                "pass --no-separator to join them anyway")
    used = _used(folder)
    if used and force:
        _check_only_ours(folder, options.prefix)
    elif used and not resume:
        raise OutputExists(folder, "exists and is not empty (use --resume to continue an interrupted run, "
                                   "--force to start over)")
    inputs = find_inputs(specs)
    for line in input_notes(inputs):
        log(line)
    log(eos_note(tokenizer))
    cut = cuts_at_newlines(tokenizer)
    if not cut:
        log(f"warning: {tokenizer.source} changes ids when text is cut at a newline: each document is encoded "
            "whole, so memory grows with the largest document")
    dtype = token_dtype(options.dtype, tokenizer.size, folder)
    job = _job(inputs, tokenizer, options, dtype)
    run = _Run(inputs, tokenizer, options, dtype, job, ReadOptions(
        options.text_field, options.doc_separator, options.split_paragraphs, cut), on_batch)
    if force and used:
        log(f"--force: the new run replaces {folder} when it completes (the old one stays until then)")
        with replacing_folder(folder) as tmp:
            return run.write(Path(tmp), Progress([], ResumePoint()))
    created = not folder.exists()
    claim = claim_folder(folder)  # one tokenize per folder: a second one is told our PID
    try:
        if not resume and _used(folder):  # again under the claim: a run beside us may have written here
            raise OutputExists(folder, "exists and is not empty: another run wrote it meanwhile (use --resume "
                                       "to continue it, --force to start over)")
        progress = _prepare_folder(folder, options.prefix, job, log)
        if (folder / INDEX_NAME).exists():
            log(f"{folder}: already complete ({INDEX_NAME} present)")
            return read_index(folder / INDEX_NAME)
        try:
            return run.write(folder, progress)
        except BaseException:
            if not sidecar_path(folder / shard_name(options.prefix, 0)).exists():  # nothing worth resuming
                (folder / JOB_NAME).unlink(missing_ok=True)
                if created and folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            raise
    finally:
        os.close(claim)


@dataclass(frozen=True)
class _Run:
    """One tokenize job, written into a folder."""

    inputs: Inputs
    tokenizer: TokenizerInfo
    options: TokenizeOptions
    dtype: str
    job: dict[str, Any]
    read: ReadOptions
    on_batch: Callable[[EncodedBatch, float], None] | None

    def write(self, folder: Path, progress: Progress) -> dict[str, Any]:
        """Shards from `progress` on, then the index (returned)."""
        tok, options = self.tokenizer, self.options
        sidecar = {"vocab_size": tok.size, "tokenizer_sha256": tok.sha256, "eos_id": tok.eos_id,
                   "job_sha256": job_sha256(self.job)}
        writer = ShardWriter(folder, options.prefix, options.shard_tokens, self.dtype, sidecar, progress)
        if not progress.shards:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / JOB_NAME, self.job)
        start, done = progress.resume, _done_bytes(self.inputs)
        try:
            for batch in encode_pieces(tok, read_pieces(self.inputs.files, self.read, (start.file, start.at))):
                writer.add(batch)
                if self.on_batch is not None:
                    self.on_batch(batch, done(batch.pieces[-1]))
            shards = writer.finish(ResumePoint(len(self.inputs.files)))
        except BaseException:
            writer.abort()
            raise
        if not shards:
            raise CorruptSource(", ".join(os.fspath(i["path"]) for i in self.job["inputs"]),
                                "holds no text (0 tokens); nothing written")
        index = {"format": INDEX_FORMAT, "version": 1, **self.job, "tokenizer": tok.source,
                 "vocab_size": tok.size, "num_tokens": sum(s["num_tokens"] for s in shards),
                 "documents": shards[-1]["documents"], "max_id": max(s["max_id"] for s in shards),
                 "shards": [{"file": shard_name(options.prefix, s["shard"]), "num_tokens": s["num_tokens"]}
                            for s in shards],
                 "skipped": [{"path": os.fspath(p), "reason": r} for p, r in self.inputs.skipped]}
        write_json(folder / INDEX_NAME, index)
        return index


def _done_bytes(inputs: Inputs) -> Callable[[Piece], float]:
    """Share of the input bytes before a piece (exact for plain text and JSON lines, by file otherwise)."""
    sizes = [p.stat().st_size for p in inputs.files]
    before = [sum(sizes[:i]) for i in range(len(sizes))]
    plain = [kind_of(p) in (("text", ""), ("jsonl", "")) for p in inputs.files]
    total = max(sum(sizes), 1)

    def share(piece: Piece) -> float:
        return (before[piece.file] + (min(piece.at, sizes[piece.file]) if plain[piece.file] else 0)) / total

    return share


def _check_options(options: TokenizeOptions, folder: Path) -> None:
    if folder.suffix == ".bin":
        raise InvalidArgument(folder, "apr tokenize writes a folder of shards; give a folder name (e.g. tokens/)")
    if options.shard_tokens < 1:
        raise InvalidArgument(None, f"must be at least 1, got {options.shard_tokens}", flag="--shard-tokens")
    if options.doc_separator is not None and (options.split_paragraphs or options.doc_separator == ""):
        raise InvalidArgument(None, "must be non-empty and not combined with --split-paragraphs", flag="--doc-separator")
    if not options.prefix or os.sep in options.prefix:
        raise InvalidArgument(None, f"must be a plain file name prefix, got {options.prefix!r}", flag="--prefix")


def _job(inputs: Inputs, tokenizer: TokenizerInfo, options: TokenizeOptions, dtype: str) -> dict[str, Any]:
    """What identifies a run: a resumed run must have the same inputs (by sha256), tokenizer and settings."""
    settings = {k: v for k, v in asdict(options).items() if k not in ("prefix", "dtype")}
    return {"inputs": [{"path": os.fspath(p), "bytes": p.stat().st_size, "sha256": _file_sha256(p)}
                       for p in inputs.files],
            "tokenizer_sha256": tokenizer.sha256, "eos_id": tokenizer.eos_id, "dtype": dtype, **settings}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _used(folder: Path) -> bool:
    if folder.exists() and not folder.is_dir():
        raise OutputExists(folder, "exists and is not a folder")
    return folder.is_dir() and any(folder.iterdir())


def _check_only_ours(folder: Path, prefix: str) -> None:
    ours = re.compile(rf"{re.escape(prefix)}-\d+\.bin(\.json)?|{JOB_NAME}|{INDEX_NAME}")
    foreign = sorted(p.name for p in folder.iterdir() if not ours.fullmatch(p.name))
    if foreign:
        raise OutputExists(folder, f"holds files apr tokenize did not write ({', '.join(foreign[:3])}); "
                                   "choose an empty or new folder")


def _prepare_folder(folder: Path, prefix: str, job: dict[str, Any], log: Callable[[str], None]) -> Progress:
    """The shards to keep: those of an interrupted run of the same job, if any."""
    if not _used(folder):
        return Progress([], ResumePoint())
    if not (folder / JOB_NAME).exists():
        raise InvalidArgument(folder, f"holds no interrupted apr tokenize run ({JOB_NAME}) to resume")
    progress = complete_shards(folder, prefix, job)
    if not (folder / INDEX_NAME).exists():
        log(f"resume: {len(progress.shards)} complete shard(s), {progress.num_tokens:,} tokens kept; "
            f"continuing in input {progress.resume.file} at {progress.resume.at:,}")
    return progress


