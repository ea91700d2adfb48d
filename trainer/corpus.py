"""Text corpora as streams of pieces: input files from paths, folders and globs; .txt/.md, JSON lines and
Parquet readers (plain, .gz or .zst) that cut documents only where the tokenizer splits anyway."""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from apr_format.errors import CorruptSource, InvalidArgument

TEXT_KINDS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst")
KNOWN_SUFFIXES = "/".join(TEXT_KINDS) + " (optionally .gz or .zst)"
BLOCK_BYTES = 1 << 20  # read size for text files
PIECE_CHARS = 1 << 16  # a document is handed to the tokenizer in pieces of about this many characters
_GLOB_CHARS = re.compile(r"[*?[]")
_BLANK_LINES = re.compile(r"\n\s*\n")  # --split-paragraphs: one or more blank lines end a document


@dataclass(frozen=True)
class Piece:
    """Part of a document. `at` is where its resume unit starts (byte offset in the decompressed file,
    or row number in a Parquet file); pieces of one JSON line or Parquet row share it."""

    file: int  # index into the input list
    at: int
    text: str
    ends_document: bool


@dataclass(frozen=True)
class ReadOptions:
    """How files become documents."""

    text_field: str = "text"  # JSON key / Parquet column
    doc_separator: str | None = None  # in .txt files; None: a .txt file is one document
    split_paragraphs: bool = False  # in .txt files: blank lines separate documents
    cut_at_newlines: bool = True  # False when the tokenizer does not split at "X\nY" (see tokenization)


@dataclass(frozen=True)
class Inputs:
    """The files a corpus names, in reading order, and those left out with the reason."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


def kind_of(path: Path) -> tuple[str, str] | None:
    """(reader kind, compression suffix or "") from the file name, case-insensitive; None when unknown."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else ""
    base = suffixes[-2] if compression and len(suffixes) == 2 else (suffixes[-1] if suffixes and not compression else "")
    return (TEXT_KINDS[base], compression) if base in TEXT_KINDS else None


def find_inputs(specs: list[str | os.PathLike]) -> Inputs:
    """Every input file that `specs` (files, folders, globs) stand for, sorted within each spec.

    Files found in folders or globs with an unknown suffix, empty, hidden or listed twice are skipped
    with the reason; a file named directly must be of a known kind.

    Raises:
        InvalidArgument: a missing path, a glob without matches, a named file of unknown kind, or no
            usable file at all.
    """
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for spec in specs:
        text = os.fspath(spec)
        root = Path(text)
        if root.is_file():
            if kind_of(root) is None:
                raise InvalidArgument(root, f"unknown data format: expected {KNOWN_SUFFIXES}")
            candidates = [root]
        elif root.is_dir():
            candidates = sorted(p for p in root.rglob("*") if p.is_file())
        elif _GLOB_CHARS.search(text):
            candidates = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not candidates:
                raise InvalidArgument(text, "matches no files")
        else:
            raise FileNotFoundError(2, "No such file or directory", text)
        for path in candidates:
            reason = _skip_reason(path, root, seen)
            if reason:
                skipped.append((path, reason))
            else:
                seen.add(path.resolve())
                files.append(path)
    if not files:
        where = os.fspath(specs[0]) if len(specs) == 1 else ", ".join(map(os.fspath, specs))
        found = f" ({len(skipped)} file(s) skipped: {skipped[0][0].name}: {skipped[0][1]}...)" if skipped else ""
        raise InvalidArgument(where, f"holds no {KNOWN_SUFFIXES} files{found}")
    return Inputs(files, skipped)


def input_notes(inputs: Inputs) -> list[str]:
    """Log lines: how many files are used, and each skipped file with the reason."""
    total = sum(p.stat().st_size for p in inputs.files)
    lines = [f"inputs: {len(inputs.files)} file(s), {total:,} bytes"
             + (f", {len(inputs.skipped)} skipped" if inputs.skipped else "")]
    lines += [f"skipped: {path}: {reason}" for path, reason in inputs.skipped]
    return lines


def _skip_reason(path: Path, root: Path, seen: set[Path]) -> str | None:
    if path.resolve() in seen:
        return "listed twice"
    if root.is_dir() and any(part.startswith(".") for part in path.relative_to(root).parts):
        return "hidden"
    if kind_of(path) is None:
        return f"unknown suffix {''.join(path.suffixes[-2:]) or '(none)'!r}; reads {KNOWN_SUFFIXES}"
    if path != root and path.stat().st_size == 0:
        return "empty file"
    return None


def read_pieces(
    files: list[Path], options: ReadOptions, start: tuple[int, int] = (0, 0)
) -> Iterator[Piece]:
    """The pieces of every document of `files`, from resume point `start` = (file index, `at`).

    Raises:
        CorruptSource: text that is not UTF-8, a JSON line or Parquet file without the text field.
    """
    first, at = start
    for index in range(first, len(files)):
        path = files[index]
        kind, compression = kind_of(path) or ("text", "")
        begin = at if index == first else 0
        reader = {"text": _text_pieces, "jsonl": _jsonl_pieces, "parquet": _parquet_pieces}[kind]
        with _opened(path, compression) as stream:
            for at_, text, ends in reader(stream, path, begin, options):
                yield Piece(index, at_, text, ends)


@contextmanager
def _opened(path: Path, compression: str) -> Iterator[BinaryIO]:
    """The file's decompressed bytes as a binary stream."""
    with open(path, "rb") as raw:
        if compression == ".gz":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream
        elif compression == ".zst":
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as stream:
                yield io.BufferedReader(stream, BLOCK_BYTES)  # adds line iteration
        else:
            yield raw


def _skip_to(stream: BinaryIO, offset: int) -> None:
    if stream.seekable():
        stream.seek(offset)
        return
    while offset > 0:
        chunk = stream.read(min(offset, BLOCK_BYTES))
        if not chunk:
            return
        offset -= len(chunk)


def _nbytes(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _text_pieces(stream: BinaryIO, path: Path, begin: int, options: ReadOptions) -> Iterator[tuple[int, str, bool]]:
    """(byte offset, text, ends document) of a text file read in blocks; separators are dropped."""
    _skip_to(stream, begin)
    decoder = codecs.getincrementaldecoder("utf-8")()
    find = _separator_finder(options)
    hold = len(options.doc_separator) - 1 if options.doc_separator else 0
    buf, at, read = "", begin, begin
    while True:
        block = stream.read(BLOCK_BYTES)
        held = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
        try:
            buf += decoder.decode(block, final=not block)
        except UnicodeDecodeError as exc:
            raise CorruptSource(path, f"is not UTF-8 text ({exc.reason} at byte {read - held + exc.start:,})") from None
        read += len(block)
        while find is not None and (found := find(buf, not block)):
            doc_end, next_doc = found
            yield from _document_pieces(buf[:doc_end], at, options.cut_at_newlines)
            at += _nbytes(buf[:next_doc])
            buf = buf[next_doc:]
        if not block:
            yield from _document_pieces(buf, at, options.cut_at_newlines)
            return
        while options.cut_at_newlines and len(buf) - hold > PIECE_CHARS:
            cut = safe_cut(buf, PIECE_CHARS, len(buf) - hold)
            if not cut:
                break
            yield at, buf[:cut], False
            at += _nbytes(buf[:cut])
            buf = buf[cut:]


def _separator_finder(options: ReadOptions) -> Callable[[str, bool], tuple[int, int] | None] | None:
    """A function giving (end of document, start of next) for the first separator in a buffer."""
    if options.doc_separator:
        sep = options.doc_separator

        def literal(buf: str, eof: bool) -> tuple[int, int] | None:
            pos = buf.find(sep)
            return (pos, pos + len(sep)) if pos >= 0 else None

        return literal
    if options.split_paragraphs:

        def blank_lines(buf: str, eof: bool) -> tuple[int, int] | None:
            match = _BLANK_LINES.search(buf)
            if match is None or (match.end() == len(buf) and not eof):  # more blank lines may follow
                return None
            return match.start(), match.end()

        return blank_lines
    return None


def _document_pieces(doc: str, at: int, cut_at_newlines: bool) -> Iterator[tuple[int, str, bool]]:
    """A whole document (ends with its last piece); an empty one yields nothing."""
    while cut_at_newlines and len(doc) > PIECE_CHARS and (cut := safe_cut(doc, PIECE_CHARS, len(doc))):
        yield at, doc[:cut], False
        at += _nbytes(doc[:cut])
        doc = doc[cut:]
    if doc:
        yield at, doc, True


def safe_cut(text: str, target: int, limit: int) -> int:
    """A position just after a newline between two non-space characters, the last one at or before
    `target`, else the first one after it (before `limit`); 0 when there is none.

    Byte-level BPE pre-tokenizers (GPT-2, Qwen, Llama 3) never join such a newline with the character
    after it, and no pre-token crosses it, so pieces cut there encode to the ids of the whole text;
    runs of newlines or spaces are never cut. `tokenization.cuts_at_newlines` checks a tokenizer.
    """
    pos = min(target, limit - 1)
    while (pos := text.rfind("\n", 1, pos)) > 0:
        if _clean_edge(text, pos):
            return pos + 1
    pos = target
    while 0 < (pos := text.find("\n", pos + 1, limit - 1)):
        if _clean_edge(text, pos):
            return pos + 1
    return 0


def _clean_edge(text: str, pos: int) -> bool:
    before, after = text[pos - 1], text[pos + 1]
    return not before.isspace() and not after.isspace() and not _combining(after)


def _combining(char: str) -> bool:
    return unicodedata.category(char) in ("Mn", "Mc", "Me")


def _jsonl_pieces(stream: BinaryIO, path: Path, begin: int, options: ReadOptions) -> Iterator[tuple[int, str, bool]]:
    _skip_to(stream, begin)
    at, field = begin, options.text_field
    for line in stream:
        here, at = at, at + len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as exc:
            raise CorruptSource(path, f"is not UTF-8 text ({exc.reason} in the line at byte {here:,})") from None
        except ValueError:
            raise CorruptSource(path, f"the line at byte {here:,} is not valid JSON") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise CorruptSource(path, f'the line at byte {here:,} has no string "{field}" field (see --text-field)')
        for _, piece, ends in _document_pieces(text, here, options.cut_at_newlines):
            yield here, piece, ends


def _parquet_pieces(stream: BinaryIO, path: Path, begin: int, options: ReadOptions) -> Iterator[tuple[int, str, bool]]:
    """Rows of the text column, one row group at a time (bounded memory)."""
    pq = _pyarrow_parquet(path)
    with _seekable(stream) as source:
        try:
            parquet = pq.ParquetFile(source)
        except Exception as exc:  # pyarrow raises ArrowInvalid (a bare Exception subclass) for non-Parquet bytes
            raise CorruptSource(path, f"is not a Parquet file ({str(exc).splitlines()[0][:160]})") from None
        field = options.text_field
        schema = parquet.schema_arrow
        if field not in schema.names:
            raise CorruptSource(path, f'has no column "{field}" (columns: {", ".join(schema.names)}); '
                                      "choose one with --text-field")
        if not str(schema.field(field).type).endswith("string"):
            raise CorruptSource(path, f'column "{field}" holds {schema.field(field).type}, not text')
        row = 0
        for group in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(group).num_rows
            if row + rows <= begin:
                row += rows
                continue
            for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=[field]):
                for text in batch.column(0).to_pylist():
                    if row >= begin:
                        if text is None:
                            raise CorruptSource(path, f'row {row:,} of column "{field}" is null')
                        for _, piece, ends in _document_pieces(text, row, options.cut_at_newlines):
                            yield row, piece, ends
                    row += 1


def _pyarrow_parquet(path: Path):  # noqa: ANN202 - the pyarrow.parquet module
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidArgument(path, "reading Parquet needs pyarrow: pip install 'apr-toolkit[parquet]'") from None
    return pq


@contextmanager
def _seekable(stream: BinaryIO) -> Iterator[BinaryIO]:
    """`stream` itself, or a decompressed copy in a temp file (Parquet readers seek to the footer)."""
    if stream.seekable():
        yield stream
        return
    with tempfile.TemporaryFile() as copy:
        shutil.copyfileobj(stream, copy, BLOCK_BYTES)
        copy.seek(0)
        yield copy
