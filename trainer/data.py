"""Token data: token files (+ JSON sidecar), aprender u32 shards, text; train/val split; seeded windows."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_format.atomic import replacing
from apr_format.errors import CorruptSource, InvalidArgument, from_os_error
from apr_format.sourceio import read_exact

from .corpus import KNOWN_SUFFIXES, ReadOptions, find_inputs, input_notes, kind_of, read_pieces
from .shards import DTYPES, INDEX_NAME, JOB_NAME, SIDECAR_FORMAT, read_index, sidecar_path, token_dtype
from .tokenization import TokenizerInfo, cuts_at_newlines, encode_pieces, eos_note

TOKEN_SUFFIX = ".bin"
_MAX_SCAN = 1 << 24  # elements per chunk when scanning a token file for its largest id
_GLOB = re.compile(r"[*?[]")


@dataclass(frozen=True)
class TokenFileInfo:
    """What a token file's sidecar says (all None/empty for aprender's bare u32 shards)."""

    dtype: str
    vocab_size: int | None = None
    num_tokens: int | None = None
    tokenizer_sha256: str | None = None
    eos_id: int | None = None


class TokenFile:
    """A token file read with pread, one slice at a time: no memory map, so a file cut short by another
    program while training reads it is a `Truncated` error naming it, never SIGBUS (and network file
    systems are read with plain reads). The file is opened for each read, so a corpus of many
    thousands of shards holds no file descriptors between reads."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, count: int) -> None:
        self.path, self.dtype, self._count = os.fspath(path), dtype, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, key: slice) -> np.ndarray:
        """Tokens of a contiguous slice, as a new array of the file's dtype.

        Raises:
            Truncated: the file is shorter than when it was opened (cut short by another program).
        """
        if not isinstance(key, slice):
            raise TypeError(f"TokenFile takes a slice, not {type(key).__name__}")
        start, stop, step = key.indices(self._count)
        if step != 1:
            raise ValueError("TokenFile slices are contiguous (step 1)")
        size = self.dtype.itemsize
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise from_os_error(self.path, exc) from None
        try:
            data = read_exact(fd, start * size, max(0, stop - start) * size, self.path)
        finally:
            os.close(fd)
        return np.frombuffer(data, self.dtype)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()


class TokenStream:
    """One or more 1-D token arrays (token files or in memory) seen as a single sequence."""

    def __init__(self, parts: list[np.ndarray], source: str, info: TokenFileInfo | None = None,
                 tokenizer: TokenizerInfo | None = None, notes: list[str] | None = None) -> None:
        self.parts = [p for p in parts if len(p)]
        self.source = source
        self.info = info
        self.tokenizer = tokenizer
        self.notes = notes or []  # log lines about how the data was read
        self._ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, crossing part boundaries when needed."""
        out, pos = [], start
        while pos < stop:
            k = int(np.searchsorted(self._ends, pos, side="right"))
            begin = int(self._ends[k - 1]) if k else 0
            take = min(stop, int(self._ends[k])) - pos
            out.append(np.asarray(self.parts[k][pos - begin : pos - begin + take], dtype=np.int64))
            pos += take
        return out[0] if len(out) == 1 else np.concatenate(out)

    def max_id(self) -> int:
        """The largest token id (scans token files in bounded chunks)."""
        best = -1
        for part in self.parts:
            for begin in range(0, len(part), _MAX_SCAN):
                best = max(best, int(part[begin : begin + _MAX_SCAN].max()))
        return best


def open_tokens(path: str | os.PathLike, tokenizer: Callable[[], TokenizerInfo] | None = None) -> TokenStream:
    """Open training data: token .bin files (sidecar or bare aprender u32) given as a file, a folder, a
    glob or an `apr tokenize` index.json, read with pread a window at a time; or text (.txt/.md, JSON lines, Parquet,
    compressed, folders or globs of them), tokenized in memory with `tokenizer()`, called only then.

    Raises:
        InvalidArgument: unknown format, a folder mixing token and text files, an unfinished
            `apr tokenize` folder, text without tokenizer, no end-of-text token.
        CorruptSource: a token file whose size or sidecar is inconsistent, text without any token.
    """
    text = os.fspath(path)
    root = Path(text)
    if root.is_dir():
        if (root / INDEX_NAME).is_file():
            return _open_index(root / INDEX_NAME)
        if (root / JOB_NAME).is_file():
            raise InvalidArgument(root, f"`apr tokenize` has not finished this folder (no {INDEX_NAME}); "
                                        f"finish it with `apr tokenize ... -o {text} --resume`")
        shards = sorted(p for p in root.rglob(f"*{TOKEN_SUFFIX}") if p.is_file())
        texts = [p for p in root.rglob("*") if p.is_file() and kind_of(p) is not None
                 and not p.name.endswith(f"{TOKEN_SUFFIX}.json")]  # a token file's sidecar is not text
        if shards and texts:
            raise InvalidArgument(root, "folder mixes token files (.bin) and text files; keep one kind per folder")
        if shards:
            return _open_shards(shards, root)
        return _tokenize_text(text, tokenizer)
    if root.name == INDEX_NAME and root.is_file():
        return _open_index(root)
    if root.suffix == TOKEN_SUFFIX and root.is_file():
        return _open_shards([root], root)
    if not root.exists() and _GLOB.search(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        shards = [p for p in matches if p.suffix == TOKEN_SUFFIX]
        if shards and any(kind_of(p) not in (None, ("jsonl", "")) for p in matches):
            raise InvalidArgument(text, "matches token files (.bin) and text files; keep one kind per glob")
        if shards:
            return _open_shards(shards, root)
    if not root.exists() and not _GLOB.search(text):
        raise FileNotFoundError(2, "No such file or directory", text)
    if root.exists() and kind_of(root) is None:
        raise InvalidArgument(root, f"unknown data format {''.join(root.suffixes[-2:])!r}: expected .bin tokens, "
                                    f"an apr tokenize folder or {INDEX_NAME}, or text ({KNOWN_SUFFIXES})")
    return _tokenize_text(text, tokenizer)


def _open_index(path: Path) -> TokenStream:
    """The shards an `apr tokenize` index lists, each checked against its recorded size."""
    index = read_index(path)
    files = [path.parent / entry["file"] for entry in index["shards"]]
    stream = _open_shards(files, path.parent)
    for file, entry, part in zip(files, index["shards"], stream.parts, strict=True):
        if len(part) != entry["num_tokens"]:
            raise CorruptSource(file, f"holds {len(part)} tokens but {path.name} says {entry['num_tokens']}")
    return stream


def _open_shards(files: list[Path], source: Path) -> TokenStream:
    opened = [open_token_file(f) for f in files]
    first = opened[0][1]
    for file, (_, info) in zip(files, opened, strict=True):
        if (info.dtype, info.vocab_size, info.tokenizer_sha256) != (
            first.dtype, first.vocab_size, first.tokenizer_sha256
        ):
            raise InvalidArgument(file, f"differs from {files[0].name} in dtype, vocab_size or tokenizer")
    return TokenStream([arr for arr, _ in opened], os.fspath(source), first)


def open_token_file(path: str | os.PathLike) -> tuple[TokenFile, TokenFileInfo]:
    """Open one token file for reading (`TokenFile`). No sidecar means aprender's little-endian u32 (spec).

    Raises:
        CorruptSource: bad sidecar, or a byte size that does not match it.
    """
    path = Path(path)
    side = sidecar_path(path)
    info = _read_sidecar(side) if side.exists() else TokenFileInfo(dtype="uint32")
    dtype = DTYPES[info.dtype]
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise CorruptSource(path, f"{size} bytes is not a whole number of {info.dtype} tokens")
    count = size // dtype.itemsize
    if info.num_tokens is not None and info.num_tokens != count:
        raise CorruptSource(path, f"holds {count} tokens but {side.name} says {info.num_tokens}")
    if count == 0:
        raise CorruptSource(path, "holds no tokens")
    return TokenFile(path, dtype, count), info


def _read_sidecar(side: Path) -> TokenFileInfo:
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CorruptSource(side, "not valid JSON") from None
    if not isinstance(meta, dict):
        raise CorruptSource(side, "expected a JSON object")
    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        raise CorruptSource(side, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    ints = {}
    for key in ("vocab_size", "num_tokens", "eos_id"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CorruptSource(side, f"{key} must be a non-negative integer, got {value!r}")
        ints[key] = value
    return TokenFileInfo(dtype=dtype, tokenizer_sha256=meta.get("tokenizer_sha256"), **ints)


def _tokenize_text(where: str, tokenizer: Callable[[], TokenizerInfo] | None) -> TokenStream:
    if tokenizer is None:
        raise InvalidArgument(
            where, "text data needs a tokenizer: pass --tokenizer tokenizer.json or --init a model carrying one"
        )
    inputs = find_inputs([where])
    info = tokenizer()
    notes = [*input_notes(inputs), eos_note(info)]
    if info.eos_id is None:
        notes[-1] = "warning: " + notes[-1]
    options = ReadOptions(cut_at_newlines=cuts_at_newlines(info))
    chunks = [batch.ids for batch in encode_pieces(info, read_pieces(inputs.files, options))]
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    if not len(tokens):
        raise CorruptSource(where, "holds no text (0 tokens)")
    return TokenStream([tokens.astype(np.uint32)], where, tokenizer=info, notes=notes)


def write_token_file(
    path: str | os.PathLike, chunks: Iterable[np.ndarray], vocab_size: int, dtype: str = "auto",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream token ids to `path` and write the `<path>.json` sidecar; both atomically.

    `dtype` "auto" picks uint16 when every id < 65536 can be stored, else uint32.
    Returns the sidecar dict.

    Raises:
        InvalidArgument: unknown dtype, or uint16 asked for a vocabulary above 65536.
    """
    dtype = token_dtype(dtype, vocab_size, path)
    np_dtype = DTYPES[dtype]
    count, max_id = 0, -1
    with replacing(path) as fh:
        for chunk in chunks:
            if len(chunk):
                max_id = max(max_id, int(chunk.max()))
                fh.write(np.asarray(chunk, dtype=np_dtype).tobytes())
                count += len(chunk)
    meta = {"format": SIDECAR_FORMAT, "dtype": dtype, "vocab_size": vocab_size, "num_tokens": count,
            "max_id": max_id, **(extra or {})}
    with replacing(sidecar_path(path)) as fh:
        fh.write(json.dumps(meta, indent=1).encode("utf-8"))
    return meta


@dataclass(frozen=True)
class Windows:
    """Where training and validation windows come from in a TokenStream."""

    n_train: int  # tokens [0, n_train) are sampled for training
    n_val: int  # tokens [n_train, n_train + n_val) are held out for validation


class TokenDataset:
    """Train/val split of a TokenStream and the windows of `seq_len + 1` tokens drawn from it.

    The last `val_fraction` of the tokens (at least one window) is the validation split and is
    never sampled for training. Training windows of a step depend only on (seed, step), so
    the data position of a run is its step and resuming needs no sampler state.
    """

    def __init__(self, stream: TokenStream, seq_len: int, val_fraction: float) -> None:
        if not 0.0 < val_fraction < 1.0:
            raise InvalidArgument(None, f"must be between 0 and 1 (exclusive), got {val_fraction}", flag="--val-fraction")
        if seq_len < 1:
            raise InvalidArgument(None, f"must be at least 1, got {seq_len}", flag="--seq-len")
        n = len(stream)
        window = seq_len + 1
        n_val = max(math.ceil(n * val_fraction), window)
        if n - n_val < window:
            raise InvalidArgument(
                stream.source,
                f"holds {n} tokens; --seq-len {seq_len} with --val-fraction {val_fraction} needs at least "
                f"{n_val + window} (one training and one validation window of {window} tokens)",
            )
        self.stream = stream
        self.seq_len = seq_len
        self.split = Windows(n_train=n - n_val, n_val=n_val)

    def train_starts(self, seed: int, step: int, grad_accum: int, batch_size: int) -> np.ndarray:
        """Start offsets [grad_accum, batch_size] of the windows used for optimizer step `step`."""
        rng = np.random.default_rng(np.random.SeedSequence([seed, step]))
        return rng.integers(0, self.split.n_train - self.seq_len, size=(grad_accum, batch_size))

    def windows(self, starts: Iterable[int]) -> np.ndarray:
        """Token windows [len(starts), seq_len + 1] (int64)."""
        return np.stack([self.stream.slice(int(s), int(s) + self.seq_len + 1) for s in starts])

    def size_warnings(self, windows_per_step: int, val_windows: int) -> list[str]:
        """Warnings, with the figures, when the data is small for the batch: training windows repeat
        within a step, or fewer validation windows fit than asked for."""
        out = []
        window, distinct = self.seq_len + 1, self.split.n_train - self.seq_len
        if windows_per_step > distinct:
            out.append(f"warning: {self.split.n_train:,} training tokens hold {distinct:,} distinct windows of "
                       f"{window} tokens but each step draws {windows_per_step}: windows repeat within a step")
        fit = (self.split.n_val - 1) // self.seq_len
        if fit < val_windows:
            out.append(f"warning: the {self.split.n_val:,} held-out tokens fit {fit} validation window(s) of "
                       f"{window} tokens, not the {val_windows} asked (--val-batches x --batch-size); "
                       f"validation loss is the mean of {fit}")
        return out

    def val_starts(self, max_windows: int) -> np.ndarray:
        """Fixed validation windows: back to back from the start of the held-out split."""
        count = min(max_windows, (self.split.n_val - 1) // self.seq_len)
        return self.split.n_train + self.seq_len * np.arange(count, dtype=np.int64)
