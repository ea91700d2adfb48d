"""`apr pretrain` / `apr train` / `apr tokenize` through the installed CLI, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr, save_apr
from apr_testing import APR_COMMAND, FIXTURES, run_apr
from apr_trainer.data import open_token_file, write_token_file
from apr_trainer.model import DecoderLM
from apr_trainer.presets import preset

SMALL = ["--seq-len", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """model.apr (the tiny preset, tied, f32), tokens.bin (vocab 512) and a copy missing one tensor."""
    import torch

    root = tmp_path_factory.mktemp("cli")
    config = preset("tiny")
    torch.manual_seed(0)
    tensors = DecoderLM(config).state_dict()
    save_apr(root / "model.apr", tensors, config.to_metadata())
    save_apr(root / "broken.apr", {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k},
             config.to_metadata())
    write_token_file(root / "tokens.bin", [np.random.default_rng(0).integers(0, 512, 4000)], 512)
    return root


@pytest.fixture(scope="module")
def fixture_model(tmp_path_factory) -> Path:
    """fixtures/tiny-qwen2-hf (real BPE tokenizer, bf16) converted with `apr convert`."""
    out = tmp_path_factory.mktemp("fixture") / "tiny.apr"
    run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", out, check=True)
    return out


def test_log_starts_with_architecture_parameters_and_loaded_tensors(tiny, tmp_path):
    proc = run_apr("pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin", "--out", tmp_path / "run",
                   "--steps", "2", *SMALL, check=True)
    lines = proc.stderr.splitlines()
    assert lines[0] == (f"architecture: llama from {tiny / 'model.apr'}: 2 layers, hidden 64, 4 heads / 2 kv heads, "
                        "vocab 512, tied embeddings")
    assert lines[1] == f"parameters: {preset('tiny').param_count():,}"
    assert lines[2] == f"weights: loaded 20/20 tensors from {tiny / 'model.apr'}"
    assert any(line.startswith("step 0 (before any update): val_loss ") and line.endswith(
        f"-- weights from {tiny / 'model.apr'}") for line in lines)
    assert proc.stdout == ""  # logs go to stderr


def test_random_init_is_said_loudly_and_json_is_alone_on_stdout(tiny, tmp_path):
    proc = run_apr("train", "--arch", "tiny", "--data", tiny / "tokens.bin", "--out", tmp_path / "run",
                   "--steps", "1", *SMALL, "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["weights"].startswith("RANDOM INIT of preset tiny (seed 0)")
    assert summary["end_step"] == 1 and Path(summary["final"]).exists()
    assert "RANDOM INIT" in proc.stderr


def test_failed_init_exits_2_and_never_trains(tiny, tmp_path):
    proc = run_apr("pretrain", "--init", tiny / "broken.apr", "--data", tiny / "tokens.bin", "--out", tmp_path / "run",
                   *SMALL)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"apr: error: {tiny / 'broken.apr'}: ") and "model.layers.1.mlp.up_proj.weight" in error
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
    proc = run_apr("pretrain", "--init", tmp_path / "absent.apr", "--data", tiny / "tokens.bin", "--out", tmp_path)
    assert proc.returncode == 2 and "absent.apr: No such file or directory" in proc.stderr


def test_cuda_without_a_gpu_is_a_clear_error(tiny, tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([*APR_COMMAND, "pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin",
                           "--out", tmp_path / "run", "--device", "cuda"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert "--device: cuda asked for but torch" in proc.stderr and "sees no CUDA GPU" in proc.stderr


def test_bad_flags_are_one_line_errors(tiny, tmp_path):
    proc = run_apr("pretrain", "--arch", "gpt5", "--data", tiny / "tokens.bin", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "unknown architecture preset 'gpt5'; known: llama-370m, tiny" in proc.stderr
    proc = run_apr("pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin")
    assert proc.returncode == 2 and "--out: is required" in proc.stderr
    proc = run_apr("pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin", "--out", tmp_path / "r",
                   "--val-fraction", "0")
    assert proc.returncode == 2 and "--val-fraction: must be between 0 and 1" in proc.stderr


def test_an_existing_run_is_never_overwritten(tiny, tmp_path):
    args = ["pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin", "--out", tmp_path / "run",
            "--steps", "1", *SMALL]
    run_apr(*args, check=True)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    proc = run_apr(*args)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_tokenize_writes_shards_and_index(fixture_model, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "corpus"
    index = json.loads(run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "-o", out, "--from", fixture_model,
                               "--shard-tokens", "4K", "--json", check=True).stdout)
    tok = Tokenizer.from_file(str(FIXTURES / "tiny-qwen2-hf" / "tokenizer.json"))
    text = (FIXTURES / "tiny-corpus.txt").read_text()
    eos = tok.token_to_id("<|im_end|>")  # the model's eos (tokenizer_config.json, generation_config.json)
    want = tok.encode(text, add_special_tokens=False).ids + [eos]
    shards = [open_token_file(out / entry["file"]) for entry in index["shards"]]
    assert [i for tokens, _ in shards for i in tokens.tolist()] == want and index["eos_id"] == eos
    assert [len(tokens) for tokens, _ in shards[:-1]] == [4000] * (len(shards) - 1) and len(shards) > 2
    assert index["dtype"] == shards[0][1].dtype == "uint16" and index["vocab_size"] == tok.get_vocab_size(True)
    run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "-o", tmp_path / "again", "--shard-tokens", "4000",
            "--tokenizer", FIXTURES / "tiny-qwen2-hf" / "tokenizer.json", check=True)
    for entry in index["shards"]:  # tokenizer_config.json beside tokenizer.json names the same eos
        assert (tmp_path / "again" / entry["file"]).read_bytes() == (out / entry["file"]).read_bytes()
    refused = run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "-o", out, "--from", fixture_model)
    assert refused.returncode == 2 and "exists and is not empty (use --resume" in refused.stderr
    both = run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "-o", tmp_path / "x")
    assert both.returncode == 2 and "give exactly one of --tokenizer" in both.stderr


def test_fixture_model_trains_on_text_and_on_its_token_file(fixture_model, tmp_path):
    """The demo path: convert, tokenize once, train; text with the carried tokenizer gives the same start."""
    run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "-o", tmp_path / "corpus", "--from", fixture_model,
            "--shard-tokens", "1000", check=True)  # shards smaller than a batch (8 x 65 tokens)
    flags = ["--steps", "20", "--seq-len", "64", "--batch-size", "8", "--lr", "3e-3", "--warmup", "2",
             "--val-every", "0", "--device", "cpu", "--json"]
    from_bin = json.loads(run_apr("pretrain", "--init", fixture_model, "--data", tmp_path / "corpus",
                                  "--out", tmp_path / "bin", *flags, check=True).stdout)
    text = run_apr("pretrain", "--init", fixture_model, "--data", FIXTURES / "tiny-corpus.txt",
                   "--out", tmp_path / "txt", *flags, check=True)
    from_text = json.loads(text.stdout)
    assert "tokenizer " in text.stderr and "400 tokens <= 512 rows" in text.stderr
    assert from_text["start_val_loss"] == from_bin["start_val_loss"]
    assert from_text["final_val_loss"] == from_bin["final_val_loss"]
    assert from_bin["final_val_loss"] < from_bin["start_val_loss"] - 1.0
    with open_apr(fixture_model) as src, open_apr(from_bin["final"]) as out:
        assert {t.dtype for t in out.tensors()} == {"bf16"}  # the input's dtype
        assert out.metadata["hf_files"] == src.metadata["hf_files"]  # tokenizer carried through
        assert out.metadata["tokenizer.merges"] == src.metadata["tokenizer.merges"]
        assert out.flags == src.flags
