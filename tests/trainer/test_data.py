"""Token data: token files and sidecars, aprender u32 shards, text tokenization, split and sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest

from apr_format.errors import CorruptSource, InvalidArgument, Truncated
from apr_testing import mixed_text_folder
from apr_trainer.corpus import KNOWN_SUFFIXES
from apr_trainer.data import (
    TokenDataset,
    TokenFile,
    TokenStream,
    open_token_file,
    open_tokens,
    sidecar_path,
    write_token_file,
)
from apr_trainer.tokenization import load_tokenizer

TEXT = "".join(
    f"Line {i} of the tale: the miller walked to the river, and the {'cat' if i % 3 else 'dog'} slept.\n"
    + ("\n" if i % 4 == 0 else "") + ("  indented line\n" if i % 7 == 0 else "")
    for i in range(120)
)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A real byte-level BPE tokenizer.json (GPT-2 style pre-tokenizer), trained on TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_token_file_roundtrip_with_sidecar(tmp_path):
    ids = np.arange(1000) % 300
    meta = write_token_file(tmp_path / "t.bin", [ids[:400], ids[400:]], vocab_size=300)
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == 1000 and meta["max_id"] == 299
    side = json.loads(sidecar_path(tmp_path / "t.bin").read_text())
    assert side["vocab_size"] == 300 and side["dtype"] == "uint16"
    arr, info = open_token_file(tmp_path / "t.bin")
    assert isinstance(arr, TokenFile) and arr.dtype == np.dtype("<u2")
    assert np.array_equal(arr, ids) and info.vocab_size == 300
    assert (tmp_path / "t.bin").stat().st_size == 2000


def test_token_file_cut_short_while_open_is_truncated(tmp_path):
    """Training reads its data with pread: a file another program truncates is an error naming it, not SIGBUS."""
    write_token_file(tmp_path / "t.bin", [np.arange(10_000) % 300], vocab_size=300)
    arr, _ = open_token_file(tmp_path / "t.bin")
    assert arr[9_990:].tolist() == list(np.arange(9_990, 10_000) % 300)
    with open(tmp_path / "t.bin", "r+b") as fh:
        fh.truncate(4_000)
    assert arr[:10].tolist() == list(range(10))
    with pytest.raises(Truncated, match="t.bin"):
        arr[9_990:]


def test_large_vocabulary_gets_uint32(tmp_path):
    meta = write_token_file(tmp_path / "t.bin", [np.array([151_000, 5, 70_000])], vocab_size=151_936)
    arr, _ = open_token_file(tmp_path / "t.bin")
    assert meta["dtype"] == "uint32" and arr.tolist() == [151_000, 5, 70_000]
    with pytest.raises(InvalidArgument, match="151936 does not fit uint16"):
        write_token_file(tmp_path / "u.bin", [np.array([1])], vocab_size=151_936, dtype="uint16")


def test_bare_bin_is_aprender_little_endian_u32(tmp_path):
    ids = np.array([1, 2, 70_000, 3], dtype="<u4")
    (tmp_path / "shard.bin").write_bytes(ids.tobytes())
    arr, info = open_token_file(tmp_path / "shard.bin")
    assert arr.tolist() == [1, 2, 70_000, 3] and info.dtype == "uint32" and info.vocab_size is None


def test_bad_token_files_are_clear_errors(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(CorruptSource, match="3 bytes is not a whole number of uint32 tokens"):
        open_token_file(tmp_path / "odd.bin")
    write_token_file(tmp_path / "t.bin", [np.arange(10)], vocab_size=300)
    with open(tmp_path / "t.bin", "ab") as fh:  # a token file that no longer matches its sidecar
        fh.write(b"\x00\x00")
    with pytest.raises(CorruptSource, match="holds 11 tokens but t.bin.json says 10"):
        open_token_file(tmp_path / "t.bin")
    sidecar_path(tmp_path / "t.bin").write_text('{"dtype": "int8"}')
    with pytest.raises(CorruptSource, match="dtype 'int8' is not one of uint16, uint32"):
        open_token_file(tmp_path / "t.bin")


def test_shard_folder_reads_as_one_stream(tmp_path):
    first, second = np.arange(0, 50, dtype="<u4"), np.arange(50, 120, dtype="<u4")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00.bin").write_bytes(first.tobytes())
    (tmp_path / "shards" / "01.bin").write_bytes(second.tobytes())
    stream = open_tokens(tmp_path / "shards")
    assert len(stream) == 120 and stream.max_id() == 119
    assert stream.slice(45, 56).tolist() == list(range(45, 56))  # crosses the shard boundary
    (tmp_path / "shards" / "notes.txt").write_text("hello")
    with pytest.raises(InvalidArgument, match="mixes token files"):
        open_tokens(tmp_path / "shards")


def test_unknown_data_format_is_rejected(tmp_path):
    (tmp_path / "data.csv").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="unknown data format '.csv'"):
        open_tokens(tmp_path / "data.csv")


def test_validation_is_the_tail_and_never_sampled():
    stream = TokenStream([np.arange(10_000, dtype=np.uint32)], "mem")
    data = TokenDataset(stream, seq_len=32, val_fraction=0.1)
    assert (data.split.n_train, data.split.n_val) == (9000, 1000)
    for step in range(200):
        starts = data.train_starts(seed=3, step=step, grad_accum=2, batch_size=8)
        assert starts.shape == (2, 8)
        assert starts.min() >= 0 and starts.max() + 33 <= data.split.n_train
    val = data.val_starts(max_windows=1000)
    assert len(val) == (1000 - 1) // 32 and val[0] == 9000 and val[-1] + 33 <= 10_000
    windows = data.windows(val[:2])
    assert windows.shape == (2, 33) and windows[0, 0] == 9000 and windows[1, 0] == 9032


def test_windows_depend_only_on_seed_and_step():
    data = TokenDataset(TokenStream([np.arange(5000, dtype=np.uint32)], "mem"), seq_len=16, val_fraction=0.05)
    a = data.train_starts(seed=1, step=7, grad_accum=1, batch_size=8)
    assert np.array_equal(a, data.train_starts(seed=1, step=7, grad_accum=1, batch_size=8))
    assert not np.array_equal(a, data.train_starts(seed=2, step=7, grad_accum=1, batch_size=8))
    assert not np.array_equal(a, data.train_starts(seed=1, step=8, grad_accum=1, batch_size=8))
    # accumulation splits the same windows: 2 x 4 draws the same 8 starts as 1 x 8
    assert np.array_equal(a.reshape(-1), data.train_starts(seed=1, step=7, grad_accum=2, batch_size=4).reshape(-1))


def test_too_little_data_names_the_numbers():
    stream = TokenStream([np.arange(40, dtype=np.uint32)], "small.bin")
    with pytest.raises(InvalidArgument, match="small.bin: holds 40 tokens; --seq-len 32 .* needs at least 66"):
        TokenDataset(stream, seq_len=32, val_fraction=0.05)


def test_jsonl_documents_end_with_eos(tmp_path, bpe_tokenizer):
    info = load_tokenizer(bpe_tokenizer)
    lines = [json.dumps({"text": "the cat"}), "", json.dumps({"text": "a dog"})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    stream = open_tokens(tmp_path / "docs.jsonl", tokenizer=lambda: info)
    enc = info.tokenizer.encode
    assert stream.slice(0, len(stream)).tolist() == enc("the cat").ids + [info.eos_id] + enc("a dog").ids + [info.eos_id]
    assert "documents: each ends with <|endoftext|> (id 0); no BOS or template tokens are added" in stream.notes


def test_text_folder_uses_md_and_upper_case_files_and_names_the_skipped(tmp_path, bpe_tokenizer):
    root = mixed_text_folder(tmp_path / "data")
    info = load_tokenizer(bpe_tokenizer)
    stream = open_tokens(root, tokenizer=lambda: info)
    enc = info.tokenizer.encode
    want = [i for doc in ("# readme\n", "upper case suffix\n", "a\n") for i in enc(doc).ids + [info.eos_id]]
    assert stream.slice(0, len(stream)).tolist() == want
    assert stream.notes[:2] == ["inputs: 3 file(s), 29 bytes, 1 skipped",
                                f"skipped: {root / 'table.csv'}: unknown suffix '.csv'; reads {KNOWN_SUFFIXES}"]


def test_empty_text_is_refused(tmp_path, bpe_tokenizer):
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(CorruptSource, match="a.txt: holds no text"):
        open_tokens(tmp_path / "a.txt", tokenizer=lambda: load_tokenizer(bpe_tokenizer))
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(CorruptSource, match="empty.bin: holds no tokens"):
        open_tokens(tmp_path / "empty.bin")


def test_text_without_end_of_text_token_is_joined_with_a_warning(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    info = load_tokenizer(tmp_path / "tokenizer.json")
    stream = open_tokens(tmp_path / "a.jsonl", tokenizer=lambda: info)
    assert info.eos_id is None and len(stream) == len(tok.encode("one").ids + tok.encode("two").ids)
    assert any(n.startswith("warning: documents: joined WITHOUT a separator") for n in stream.notes)


def test_small_data_with_a_big_batch_warns_with_the_figures():
    data = TokenDataset(TokenStream([np.arange(200, dtype=np.uint32)], "mem"), seq_len=32, val_fraction=0.1)
    assert data.size_warnings(windows_per_step=8, val_windows=4) == [
        "warning: the 33 held-out tokens fit 1 validation window(s) of 33 tokens, not the 4 asked "
        "(--val-batches x --batch-size); validation loss is the mean of 1"]
    assert "windows repeat within a step" in data.size_warnings(windows_per_step=200, val_windows=1)[0]
    assert TokenDataset(TokenStream([np.arange(5000, dtype=np.uint32)], "m"), 32, 0.1).size_warnings(8, 8) == []


def test_text_that_is_not_utf8_is_a_clear_error(tmp_path, bpe_tokenizer):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\r\n".encode("latin-1"))
    with pytest.raises(CorruptSource, match="latin1.txt: is not UTF-8 text"):
        open_tokens(tmp_path / "latin1.txt", tokenizer=lambda: load_tokenizer(bpe_tokenizer))
    (tmp_path / "crlf.txt").write_bytes(b"one\r\ntwo\r\n")
    info = load_tokenizer(bpe_tokenizer)
    stream = open_tokens(tmp_path / "crlf.txt", tokenizer=lambda: info)
    assert stream.slice(0, len(stream)).tolist() == info.tokenizer.encode("one\r\ntwo\r\n").ids + [info.eos_id]


def test_text_without_tokenizer_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(InvalidArgument, match="text data needs a tokenizer"):
        open_tokens(tmp_path / "a.txt")
