"""`apr tokenize`'s pipeline: fixed-size shards and index, resume from the last complete shard, sharded data read
back by the trainer as one stream."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apr_format.errors import CorruptSource, InvalidArgument, OutputExists
from apr_trainer import corpus
from apr_trainer.data import TokenDataset, TokenStream, open_tokens
from apr_trainer.pretokenize import TokenizeOptions, tokenize_corpus
from apr_trainer.shards import INDEX_NAME, JOB_NAME
from apr_trainer.tokenization import load_tokenizer

from apr_testing import build_bpe_tokenizer, tricky_text


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    return load_tokenizer(build_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", "qwen"))


@pytest.fixture()
def docs_folder(tmp_path):
    """Documents as JSON lines (gz) and a .txt with a separator; long ones are cut into pieces."""
    import gzip

    docs = [tricky_text(n, seed=n) for n in (50, 3000, 10, 700, 9000, 1, 400)]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[:4]).encode()))
    (folder / "b.txt").write_text("<|endoftext|>".join(docs[4:]))
    return folder, docs


def expected(info, docs: list[str]) -> list[int]:
    """What `tokenizers` gives for each document, plus the end-of-text id."""
    return [i for doc in docs for i in info.tokenizer.encode(doc, add_special_tokens=False).ids + [info.eos_id]]


def _all_tokens(folder) -> list[int]:
    stream = open_tokens(folder)
    return stream.slice(0, len(stream)).tolist()


def test_shards_smaller_than_a_batch_hold_exactly_the_documents(info, docs_folder, tmp_path, monkeypatch):
    folder, docs = docs_folder
    monkeypatch.setattr(corpus, "PIECE_CHARS", 500)
    options = TokenizeOptions(doc_separator="<|endoftext|>", shard_tokens=37)
    index = tokenize_corpus([folder], tmp_path / "out", info, options)
    want = expected(info, docs)
    assert _all_tokens(tmp_path / "out") == want  # index.json lists the shards
    assert index["num_tokens"] == len(want) and index["documents"] == len(docs)
    assert [s["num_tokens"] for s in index["shards"]] == [37] * (len(want) // 37) + ([len(want) % 37] if len(want) % 37 else [])
    assert index["tokenizer_sha256"] == info.sha256 and index["eos_id"] == info.eos_id
    assert [(i["path"], i["bytes"]) for i in index["inputs"]] == [(str(p), p.stat().st_size)
                                                                   for p in sorted(folder.iterdir())]
    import hashlib

    assert index["inputs"][1]["sha256"] == hashlib.sha256((folder / "b.txt").read_bytes()).hexdigest()
    by_glob = open_tokens(f"{tmp_path}/out/tokens-*.bin")
    assert by_glob.slice(0, len(by_glob)).tolist() == want
    assert _all_tokens(tmp_path / "out" / INDEX_NAME) == want
    first = json.loads((tmp_path / "out" / "tokens-00000.bin.json").read_text())
    assert first["dtype"] == "uint16" and first["num_tokens"] == 37 and first["vocab_size"] == info.size


@pytest.mark.parametrize("stop_after", [1, 3, 6])
@pytest.mark.parametrize("shard_tokens", [37, 1000])
def test_an_interrupted_run_resumes_to_the_same_shards(info, docs_folder, tmp_path, monkeypatch, stop_after,
                                                       shard_tokens):
    folder, docs = docs_folder
    monkeypatch.setattr(corpus, "PIECE_CHARS", 500)
    monkeypatch.setattr("apr_trainer.tokenization.BATCH_CHARS", 900)  # many batches, shards end inside them
    options = TokenizeOptions(doc_separator="<|endoftext|>", shard_tokens=shard_tokens)
    whole = tokenize_corpus([folder], tmp_path / "whole", info, options)
    seen = []

    def interrupt(batch, done):
        seen.append(batch)
        if len(seen) == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus([folder], tmp_path / "cut", info, options, on_batch=interrupt)
    assert not (tmp_path / "cut" / INDEX_NAME).exists()
    if (tmp_path / "cut").exists():
        with pytest.raises(InvalidArgument, match="has not finished this folder"):
            open_tokens(tmp_path / "cut")
        with pytest.raises(OutputExists, match="use --resume to continue"):
            tokenize_corpus([folder], tmp_path / "cut", info, options)
    lines = []
    resumed = tokenize_corpus([folder], tmp_path / "cut", info, options, resume=True, log=lines.append)
    assert {k: v for k, v in resumed.items()} == whole
    for entry in whole["shards"]:
        assert (tmp_path / "cut" / entry["file"]).read_bytes() == (tmp_path / "whole" / entry["file"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def test_resume_refuses_other_inputs_and_force_replaces(info, docs_folder, tmp_path):
    folder, _ = docs_folder
    options = TokenizeOptions(shard_tokens=50)
    tokenize_corpus([folder], tmp_path / "out", info, options)
    (tmp_path / "out" / INDEX_NAME).unlink()  # as if interrupted before the index
    (folder / "b.txt").write_text("changed")
    with pytest.raises(InvalidArgument, match="out: holds a tokenize run with other inputs; use --force"):
        tokenize_corpus([folder], tmp_path / "out", info, options, resume=True)
    index = tokenize_corpus([folder], tmp_path / "out", info, options, force=True)
    assert len(_all_tokens(tmp_path / "out")) == index["num_tokens"]
    assert index["inputs"][1]["bytes"] == len("changed")
    assert len(list((tmp_path / "out").glob("tokens-*.bin"))) == len(index["shards"])  # no stale shard left
    (tmp_path / "out" / "mine.txt").write_text("a user's file")
    with pytest.raises(OutputExists, match=r"holds files apr tokenize did not write \(mine.txt\)"):
        tokenize_corpus([folder], tmp_path / "out", info, options, force=True)


def test_empty_input_writes_nothing(info, tmp_path):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(CorruptSource, match="a.txt: holds no text \\(0 tokens\\); nothing written"):
        tokenize_corpus([tmp_path / "a.txt"], tmp_path / "out", info, TokenizeOptions())
    assert not (tmp_path / "out").exists()


def test_tokenizer_without_end_of_text_needs_no_separator(tmp_path, docs_folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder, docs = docs_folder
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    plain = load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(InvalidArgument, match="tokenizer.json: has no end-of-text token, so documents would run "
                                              "together; pass --no-separator"):
        tokenize_corpus([folder], tmp_path / "out", plain, TokenizeOptions())
    lines = []
    index = tokenize_corpus([folder], tmp_path / "out", plain, TokenizeOptions(no_separator=True), log=lines.append)
    assert index["eos_id"] is None and "documents: joined WITHOUT a separator" in lines[1]


def test_windows_across_shard_boundaries_equal_one_file():
    tokens = np.arange(3000, dtype=np.uint32)
    shards = TokenStream([tokens[i : i + 29] for i in range(0, 3000, 29)], "shards")
    one = TokenStream([tokens], "one")
    a, b = TokenDataset(shards, 32, 0.1), TokenDataset(one, 32, 0.1)
    assert a.split == b.split
    for step in range(20):
        starts = a.train_starts(5, step, 2, 8).reshape(-1)
        assert np.array_equal(a.windows(starts), b.windows(starts))
    assert np.array_equal(a.windows(a.val_starts(10)), b.windows(b.val_starts(10)))


def test_unfinished_folder_and_job_file_are_explained(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / JOB_NAME).write_text("{}")
    with pytest.raises(InvalidArgument, match="has not finished this folder .*--resume"):
        open_tokens(tmp_path / "run")
