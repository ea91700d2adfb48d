"""Token shards on disk: PREFIX-00000.bin (+ sidecar) published one by one, the job file that makes a run
resumable, the index of a finished run, and where an interrupted run continues."""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_format.atomic import replacing
from apr_format.errors import CorruptSource, InvalidArgument

from .corpus import Piece
from .tokenization import EncodedBatch

INDEX_NAME = "index.json"
INDEX_FORMAT = "apr-token-index"
JOB_NAME = "tokenize-job.json"  # written before the first shard; an index without it never exists
SIDECAR_FORMAT = "apr-tokens"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def sidecar_path(token_file: str | os.PathLike) -> Path:
    """`<file>.json` next to a token file (nanoGPT keeps vocab_size beside its .bin the same way)."""
    return Path(os.fspath(token_file) + ".json")


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:05d}.bin"


def token_dtype(requested: str, vocab_size: int, where: str | os.PathLike) -> str:
    """"auto" -> uint16 when every id < 65536 fits, else uint32; checks an explicit choice.

    Raises:
        InvalidArgument: unknown dtype, or uint16 asked for a vocabulary above 65536.
    """
    if requested == "auto":
        return "uint16" if vocab_size <= 1 << 16 else "uint32"
    if requested not in DTYPES:
        raise InvalidArgument(where, f"unknown token dtype {requested!r} (choose auto, uint16 or uint32)")
    if requested == "uint16" and vocab_size > 1 << 16:
        raise InvalidArgument(where, f"vocabulary of {vocab_size} does not fit uint16 tokens; use uint32")
    return requested


def job_sha256(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode("utf-8")).hexdigest()


def write_json(path: Path, value: dict[str, Any]) -> None:
    with replacing(path) as fh:
        fh.write(json.dumps(value, indent=1).encode("utf-8"))


@dataclass(frozen=True)
class ResumePoint:
    """Where the next shard's first token comes from: re-read input `file` from `at`, drop `skip` ids."""

    file: int = 0
    at: int = 0
    skip: int = 0


@dataclass(frozen=True)
class Progress:
    """What the complete shards of a run hold."""

    shards: list[dict[str, Any]]  # each shard's sidecar
    resume: ResumePoint

    @property
    def num_tokens(self) -> int:
        return sum(s["num_tokens"] for s in self.shards)

    @property
    def documents(self) -> int:
        return self.shards[-1]["documents"] if self.shards else 0


def complete_shards(folder: Path, prefix: str, job: dict[str, Any]) -> Progress:
    """The shards a previous run of the same job finished, in order, and where to continue.

    Raises:
        InvalidArgument: the folder holds a run of a different job (other inputs, tokenizer or settings).
    """
    job_file = folder / JOB_NAME
    if not job_file.exists():
        return Progress([], ResumePoint())
    try:
        before = json.loads(job_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CorruptSource(job_file, "not valid JSON") from None
    changed = sorted(k for k in set(before) | set(job) if before.get(k) != job.get(k))
    if changed:
        raise InvalidArgument(folder, f"holds a tokenize run with other {', '.join(changed)}; "
                                      "use --force to start over")
    digest, shards = job_sha256(job), []
    while True:
        path = folder / shard_name(prefix, len(shards))
        side = sidecar_path(path)
        if not (path.exists() and side.exists()):
            break
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
            ResumePoint(**meta["resume"])
            complete = (meta["job_sha256"] == digest
                        and path.stat().st_size == meta["num_tokens"] * DTYPES[meta["dtype"]].itemsize)
        except (ValueError, KeyError, TypeError):  # not one of this run's sidecars: rewrite from here
            complete = False
        if not complete:
            break
        shards.append(meta)
    resume = ResumePoint(**shards[-1]["resume"]) if shards else ResumePoint()
    return Progress(shards, resume)


class ShardWriter:
    """Splits encoded batches into shards of `shard_tokens`; each shard's .bin and sidecar are written
    atomically, the sidecar last, and record the resume point of the next shard."""

    def __init__(self, folder: Path, prefix: str, shard_tokens: int, dtype: str, sidecar: dict[str, Any],
                 progress: Progress) -> None:
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.dtype = dtype
        self.sidecar = sidecar
        self.shards = list(progress.shards)
        self.documents = progress.documents
        self._drop = progress.resume.skip  # ids of the resumed unit that earlier shards hold
        self._stack: ExitStack | None = None
        self._fh: Any = None
        self._in_shard = 0
        self._max_id = -1
        self._unit: tuple[int, int] | None = None  # (file, at) of the last piece seen
        self._unit_before = 0  # its ids in earlier batches

    def add(self, batch: EncodedBatch) -> None:
        ends = np.cumsum(batch.lengths)
        total = int(ends[-1]) if len(ends) else 0
        ending = np.fromiter((p.ends_document for p in batch.pieces), dtype=bool, count=len(batch.pieces))
        doc_ends = ends[ending & (batch.lengths > 0)]
        pos = min(self._drop, total)
        self._drop -= pos
        while pos < total:
            stop = min(total, pos + self.shard_tokens - self._in_shard)
            self._write(batch.ids[pos:stop])
            self.documents += int(np.searchsorted(doc_ends, stop, "right") - np.searchsorted(doc_ends, pos, "right"))
            pos = stop
            if self._in_shard == self.shard_tokens:
                self._close(self._resume_at(batch, ends, pos))
        if batch.pieces:
            last = len(batch.pieces) - 1
            self._unit_before = self._unit_ids(batch, ends, last, total)
            self._unit = _key(batch.pieces[last])

    def finish(self, end: ResumePoint) -> list[dict[str, Any]]:
        """Publish the last, partial shard; the sidecars of all shards in order."""
        if self._in_shard:
            self._close(end)
        return self.shards

    def abort(self) -> None:
        """Discard the shard being written (its temp file); published shards stay for --resume."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def _write(self, ids: np.ndarray) -> None:
        if self._stack is None:
            self._stack = ExitStack()
            self._fh = self._stack.enter_context(replacing(self.folder / shard_name(self.prefix, len(self.shards))))
        self._fh.write(ids.astype(DTYPES[self.dtype]).tobytes())
        self._in_shard += len(ids)
        self._max_id = max(self._max_id, int(ids.max()))

    def _close(self, resume: ResumePoint) -> None:
        stack, self._stack = self._stack, None
        stack.close()
        path = self.folder / shard_name(self.prefix, len(self.shards))
        meta = {"format": SIDECAR_FORMAT, "dtype": self.dtype, **self.sidecar, "shard": len(self.shards),
                "num_tokens": self._in_shard, "max_id": self._max_id, "documents": self.documents,
                "resume": resume.__dict__}
        write_json(sidecar_path(path), meta)
        self.shards.append(meta)
        self._in_shard, self._max_id = 0, -1

    def _resume_at(self, batch: EncodedBatch, ends: np.ndarray, pos: int) -> ResumePoint:
        """The unit holding id `pos` of the batch (the last one when `pos` is its end) and its ids before."""
        k = min(int(np.searchsorted(ends, pos, "right")), len(ends) - 1)
        piece = batch.pieces[k]
        return ResumePoint(piece.file, piece.at, self._unit_ids(batch, ends, k, pos))

    def _unit_ids(self, batch: EncodedBatch, ends: np.ndarray, k: int, pos: int) -> int:
        """Ids before position `pos` that belong to piece k's unit (earlier batches included)."""
        key = _key(batch.pieces[k])
        first = k
        while first > 0 and _key(batch.pieces[first - 1]) == key:
            first -= 1
        start = int(ends[first - 1]) if first else 0
        return pos - start + (self._unit_before if first == 0 and key == self._unit else 0)


def _key(piece: Piece) -> tuple[int, int]:
    return piece.file, piece.at


def read_index(path: Path) -> dict[str, Any]:
    """A finished run's index, checked for the fields a reader needs.

    Raises:
        CorruptSource: not an apr token index.
    """
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CorruptSource(path, "not valid JSON") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise CorruptSource(path, f'is not an `apr tokenize` index (expected "format": "{INDEX_FORMAT}" and "shards")')
    return index
