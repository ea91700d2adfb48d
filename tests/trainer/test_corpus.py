"""Corpus readers: inputs from folders and globs, .txt/.md/.jsonl/.parquet (+ .gz/.zst), pieces cut without
changing a single token, hostile inputs as one clear error."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from apr_format.errors import CorruptSource, InvalidArgument
from apr_trainer import corpus
from apr_trainer.corpus import ReadOptions, find_inputs, read_pieces
from apr_trainer.tokenization import TokenizerInfo, cuts_at_newlines, encode_pieces, load_tokenizer

from apr_testing import build_bpe_tokenizer, mixed_text_folder, tricky_text

@pytest.fixture(scope="module", params=["gpt2", "qwen"])
def tokenizer(request, tmp_path_factory) -> TokenizerInfo:
    return load_tokenizer(build_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", request.param))


def encode_files(info: TokenizerInfo, files, options: ReadOptions | None = None, start=(0, 0)) -> list[int]:
    options = options or ReadOptions(cut_at_newlines=cuts_at_newlines(info))
    return [int(i) for batch in encode_pieces(info, read_pieces(files, options, start)) for i in batch.ids]


def expected(info: TokenizerInfo, docs: list[str]) -> list[int]:
    """What `tokenizers` gives for each document, plus the end-of-text id."""
    return [i for doc in docs for i in info.tokenizer.encode(doc, add_special_tokens=False).ids + [info.eos_id]]


def test_a_big_single_document_gives_the_ids_of_encoding_it_whole(tokenizer, tmp_path):
    text = tricky_text(3_000_000, seed=1)
    path = tmp_path / "big.txt"
    path.write_bytes(text.encode("utf-8"))
    assert cuts_at_newlines(tokenizer)
    pieces = list(read_pieces([path], ReadOptions()))
    assert len(pieces) > 40 and "".join(p.text for p in pieces) == text  # many cuts, nothing lost
    assert [p.ends_document for p in pieces].count(True) == 1
    assert encode_files(tokenizer, [path]) == expected(tokenizer, [text])


def test_cuts_at_every_block_and_piece_size(tokenizer, tmp_path, monkeypatch):
    """Tiny blocks and pieces: cuts land next to every kind of line, block ends split UTF-8 characters."""
    text = tricky_text(40_000, seed=2)
    path = tmp_path / "small.txt"
    path.write_bytes(text.encode("utf-8"))
    for block, piece in [(7, 16), (64, 50), (1000, 97)]:
        monkeypatch.setattr(corpus, "BLOCK_BYTES", block)
        monkeypatch.setattr(corpus, "PIECE_CHARS", piece)
        assert encode_files(tokenizer, [path]) == expected(tokenizer, [text]), (block, piece)


def test_a_tokenizer_that_changes_ids_at_cuts_gets_whole_documents(tmp_path, monkeypatch):
    info = load_tokenizer(build_bpe_tokenizer(tmp_path / "tokenizer.json", "prefix-space"))
    assert not cuts_at_newlines(info)  # a prefix space on every piece would change the first id
    text = tricky_text(200_000, seed=3)
    (tmp_path / "doc.txt").write_text(text)
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 4096)
    pieces = list(read_pieces([tmp_path / "doc.txt"], ReadOptions(cut_at_newlines=False)))
    assert len(pieces) == 1 and pieces[0].text == text
    assert encode_files(info, [tmp_path / "doc.txt"]) == expected(info, [text])


DOCS = ["First story.\nIt has two lines.", "  Second\n\n\nwith blank lines and 日本語  ", "third 🙂", "x" * 5000]


def _write_formats(folder, docs):
    """The same documents as .txt with a separator, .jsonl and .parquet (two row groups), plain and compressed."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    folder.mkdir()
    txt = "<|endoftext|>".join(docs).encode("utf-8")
    jsonl = "".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)).encode("utf-8")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), folder / "d.parquet", row_group_size=3)
    parquet = (folder / "d.parquet").read_bytes()
    for name, data in (("d.txt", txt), ("d.jsonl", jsonl), ("d.parquet", parquet)):
        (folder / name).write_bytes(data)
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        (folder / f"{name}.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    return folder


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_txt_jsonl_and_parquet_give_the_same_tokens(tokenizer, tmp_path, compression, monkeypatch):
    folder = _write_formats(tmp_path / "formats", DOCS)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 700)  # the long document is cut into pieces too
    want = expected(tokenizer, DOCS)
    separated = ReadOptions(doc_separator="<|endoftext|>", cut_at_newlines=True)
    assert encode_files(tokenizer, [folder / f"d.txt{compression}"], separated) == want
    assert encode_files(tokenizer, [folder / f"d.jsonl{compression}"]) == want
    assert encode_files(tokenizer, [folder / f"d.parquet{compression}"]) == want


def test_blank_lines_split_paragraphs(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "p.txt").write_text("one\ntwo\n\nthree\n \n\n\nfour  \n\n")
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 3)  # a blank-line run split across reads
    options = ReadOptions(split_paragraphs=True)
    assert encode_files(tokenizer, [tmp_path / "p.txt"], options) == expected(tokenizer, ["one\ntwo", "three", "four  "])


def test_reading_resumes_at_a_recorded_piece(tokenizer, tmp_path, monkeypatch):
    """Every piece's `at` is a place reading can start again and give the rest of the ids."""
    folder = _write_formats(tmp_path / "formats", DOCS)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 300)
    for name, options in [("d.txt.zst", ReadOptions(doc_separator="<|endoftext|>")), ("d.jsonl.gz", ReadOptions()),
                          ("d.parquet", ReadOptions())]:
        files = [folder / name]
        pieces = list(read_pieces(files, options))
        for k in range(len(pieces)):
            if k and pieces[k].at == pieces[k - 1].at:
                continue  # inside a unit (JSON line, Parquet row): resume points are unit starts
            rest = list(read_pieces(files, options, (0, pieces[k].at)))
            assert [p.text for p in rest] == [p.text for p in pieces[k:]], (name, k)


def test_inputs_from_folders_and_globs_with_skipped_files_named(tmp_path):
    root = mixed_text_folder(tmp_path / "data")
    (root / "empty.txt").write_text("")
    (root / ".cache").mkdir()
    (root / ".cache" / "c.txt").write_text("hidden\n")
    inputs = find_inputs([root])
    assert [p.relative_to(root).as_posix() for p in inputs.files] == ["README.md", "b.TXT", "sub/a.txt"]
    reasons = {p.relative_to(root).as_posix(): r for p, r in inputs.skipped}
    assert reasons == {".cache/c.txt": "hidden", "empty.txt": "empty file",
                       "table.csv": "unknown suffix '.csv'; reads " + corpus.KNOWN_SUFFIXES}
    by_glob = find_inputs([f"{root}/**/*.txt", root / "README.md", root / "sub" / "a.txt"])
    assert [p.name for p in by_glob.files] == ["a.txt", "README.md"]
    assert [(p.name, r) for p, r in by_glob.skipped] == [("empty.txt", "empty file"), ("a.txt", "listed twice")]
    with pytest.raises(InvalidArgument, match=r"data/\*\.parquet: matches no files"):
        find_inputs([f"{root}/*.parquet"])
    with pytest.raises(InvalidArgument, match=r"table.csv: unknown data format"):
        find_inputs([root / "table.csv"])
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.csv").write_text("1")
    with pytest.raises(InvalidArgument, match=r"only: holds no .* files \(1 file\(s\) skipped: x.csv: unknown suffix"):
        find_inputs([tmp_path / "only"])


def test_hostile_inputs_are_one_clear_error(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for tail, problem in ((" au lait", "invalid continuation byte"), ("", "unexpected end of data")):
        (tmp_path / "latin1.txt").write_bytes(b"fine\n" * 300_000 + f"caf\xe9{tail}".encode("latin-1"))
        with pytest.raises(CorruptSource, match=rf"latin1.txt: is not UTF-8 text \({problem} at byte 1,500,003\)"):
            encode_files(tokenizer, [tmp_path / "latin1.txt"])
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(CorruptSource, match='bad.jsonl: the line at byte 15 has no string "text" field'):
        encode_files(tokenizer, [tmp_path / "bad.jsonl"])
    (tmp_path / "bytes.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(CorruptSource, match="bytes.jsonl: is not UTF-8 text"):
        encode_files(tokenizer, [tmp_path / "bytes.jsonl"])
    pq.write_table(pa.table({"content": ["a", "b"], "url": ["u", "v"]}), tmp_path / "other.parquet")
    with pytest.raises(CorruptSource, match=r'other.parquet: has no column "text" \(columns: content, url\); '
                                            "choose one with --text-field"):
        encode_files(tokenizer, [tmp_path / "other.parquet"])
    assert encode_files(tokenizer, [tmp_path / "other.parquet"], ReadOptions(text_field="content")) == \
        expected(tokenizer, ["a", "b"])
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(CorruptSource, match='ints.parquet: column "text" holds int64, not text'):
        encode_files(tokenizer, [tmp_path / "ints.parquet"])
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(CorruptSource, match='null.parquet: row 1 of column "text" is null'):
        encode_files(tokenizer, [tmp_path / "null.parquet"])
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CorruptSource, match="fake.parquet: is not a Parquet file"):
        encode_files(tokenizer, [tmp_path / "fake.parquet"])


def test_piece_ids_are_int64_batches(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld\n")
    batches = list(encode_pieces(tokenizer, read_pieces([tmp_path / "a.txt"], ReadOptions())))
    assert len(batches) == 1 and batches[0].ids.dtype == np.int64 and batches[0].lengths.sum() == len(batches[0].ids)
