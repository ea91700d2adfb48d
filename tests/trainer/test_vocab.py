"""Vocabulary compatibility (falsifiers 005/006): tokenizer size and token ids against the model's rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from apr_format import save_apr
from apr_format.architecture import ArchitectureConfig
from apr_format.errors import VocabMismatch
from apr_testing import run_apr
from apr_trainer.data import write_token_file
from apr_trainer.tokenization import check_vocab, load_tokenizer

QWEN_TOKENIZER_SIZE = 151_665  # 151,643 BPE tokens + 22 added special tokens
QWEN_SPECIALS = 22
QWEN2_ROWS = 151_936  # Qwen2 pads its embedding above the tokenizer (peft#2415)
SMALL = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32,
             max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def qwen_sized_tokenizer(tmp_path_factory):
    """A real tokenizers WordLevel tokenizer with Qwen2's size: 151,643 words + 22 special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, QWEN_TOKENIZER_SIZE - QWEN_SPECIALS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"] + [f"<|special_{i}|>" for i in range(QWEN_SPECIALS - 1)])
    folder = tmp_path_factory.mktemp("qwen-tok")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "corpus.txt").write_text(" ".join(f"w{(i * 7919) % 151_000 + 1}" for i in range(400)))
    assert tok.get_vocab_size(with_added_tokens=True) == QWEN_TOKENIZER_SIZE
    return folder


def _target(path, family: str, rows: int, with_tensors: bool):
    """An .apr of `family` with `rows` embedding rows; tensors only where the run must load them."""
    config = ArchitectureConfig(family=family, vocab_size=rows, attention_bias=family == "qwen2", **SMALL)
    tensors = {}
    if with_tensors:
        from apr_trainer.model import DecoderLM

        tensors = DecoderLM(config).state_dict()
    save_apr(path, tensors, config.to_metadata())
    return path


def test_qwen_tokenizer_fits_qwen2_vocab(tmp_path, qwen_sized_tokenizer):
    model = _target(tmp_path / "qwen2.apr", "qwen2", QWEN2_ROWS, with_tensors=True)
    proc = run_apr("pretrain", "--init", model, "--tokenizer", qwen_sized_tokenizer / "tokenizer.json",
                   "--data", qwen_sized_tokenizer / "corpus.txt", "--out", tmp_path / "run",
                   "--seq-len", "16", "--check-only")
    assert proc.returncode == 0, proc.stderr
    assert f"{QWEN_TOKENIZER_SIZE} tokens <= {QWEN2_ROWS} rows" in proc.stderr
    assert "loaded 14/14 tensors" in proc.stderr and "check only" in proc.stderr


@pytest.mark.parametrize("rows", [32_000, 128_256, None],
                         ids=["init-llama-32000", "init-llama-128256", "no-init-llama-370m"])
def test_qwen_tokenizer_rejected_by_llama_vocab(tmp_path, qwen_sized_tokenizer, rows):
    """--init a Llama of 32,000 / 128,256 rows: size > rows. No --init: llama-370m needs exactly 50,257."""
    init = ["--init", _target(tmp_path / "llama.apr", "llama", rows, with_tensors=False)] if rows else []
    proc = run_apr("pretrain", *init, "--tokenizer", qwen_sized_tokenizer / "tokenizer.json",
                   "--data", qwen_sized_tokenizer / "corpus.txt", "--out", tmp_path / "run", "--steps", "1")
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("apr: error: ") and "Traceback" not in proc.stderr
    assert f"has {QWEN_TOKENIZER_SIZE} tokens" in error
    if rows:
        assert f"only {rows} embedding rows" in error
    else:
        assert "vocabulary is 50257; without --init the tokenizer size must equal it exactly" in error
    assert not (tmp_path / "run").exists()  # nothing written, nothing trained


def test_token_ids_beyond_the_embedding_are_rejected(tmp_path):
    model = _target(tmp_path / "qwen2.apr", "qwen2", 300, with_tensors=False)
    ids = np.arange(2000) % 300
    ids[1234] = 300  # one id past the last row
    (tmp_path / "bare.bin").write_bytes(ids.astype("<u4").tobytes())
    proc = run_apr("pretrain", "--init", model, "--data", tmp_path / "bare.bin", "--out", tmp_path / "run")
    assert proc.returncode == 2
    assert "token id 300 appears in the data but the model has only 300 embedding rows" in proc.stderr


def test_declared_token_file_vocab_is_checked():
    with pytest.raises(VocabMismatch, match="declares vocab_size 50304 but the model has only 50257 embedding rows"):
        check_vocab(50_257, where="m.apr", declared=50_304, max_id=100)
    check_vocab(151_936, where="m.apr", declared=151_665, max_id=151_664)


def test_random_init_of_default_needs_exactly_its_vocab(tmp_path, qwen_sized_tokenizer):
    """Spec: without --init the tokenizer size must equal llama-370m's 50,257 (<= is not enough)."""
    info = load_tokenizer(qwen_sized_tokenizer / "tokenizer.json")
    small = replace(info, size=50_000, added=0)
    with pytest.raises(VocabMismatch, match="has 50000 tokens .* vocabulary is 50257; without --init .* exactly"):
        check_vocab(50_257, where="preset llama-370m", tokenizer=small, exact=50_257)
    check_vocab(50_257, where="preset llama-370m", tokenizer=replace(info, size=50_257), exact=50_257)
    write_token_file(tmp_path / "t.bin", [np.arange(100)], vocab_size=50_000)
    proc = run_apr("pretrain", "--data", tmp_path / "t.bin", "--out", tmp_path / "run", "--check-only")
    assert proc.returncode == 2
    assert "declares vocab_size 50000 but the architecture's vocabulary is 50257" in proc.stderr
