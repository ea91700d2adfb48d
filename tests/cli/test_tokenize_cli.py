"""`apr tokenize` through the installed CLI: logs, globs and skipped files, kill -9 and --resume, data for pretrain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from apr_testing import APR_COMMAND, FIXTURES, build_bpe_tokenizer, mixed_text_folder, run_apr, tricky_text

TOKENIZER = FIXTURES / "tiny-qwen2-hf" / "tokenizer.json"


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """About 8 MB of JSON lines: several encode batches, so a kill lands while later shards are written."""
    root = tmp_path_factory.mktemp("big")
    text = tricky_text(8_000_000, seed=7)
    with open(root / "big.jsonl", "w", encoding="utf-8") as fh:
        for start in range(0, len(text), 3000):
            fh.write(json.dumps({"text": text[start : start + 3000]}) + "\n")
    return root / "big.jsonl"


def test_kill_9_mid_shard_then_resume_gives_the_uninterrupted_shards(big_jsonl, tmp_path):
    args = ["tokenize", big_jsonl, "--tokenizer", TOKENIZER, "--shard-tokens", "300K", "-q"]
    run_apr(*args, "-o", tmp_path / "whole", check=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen([*APR_COMMAND, *map(str, args), "-o", str(out)], stderr=subprocess.DEVNULL)
    while not (out / "tokens-00000.bin.json").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: make the input bigger"
    assert not (out / "index.json").exists()
    refused = run_apr("pretrain", "--arch", "tiny", "--data", out, "--out", tmp_path / "run", "--check-only")
    assert refused.returncode == 2 and "has not finished this folder (no index.json)" in refused.stderr
    resumed = run_apr(*args[:-1], "-o", out, "--resume", check=True)
    assert "resume: " in resumed.stderr and "complete shard(s)" in resumed.stderr
    whole = json.loads((tmp_path / "whole" / "index.json").read_text())
    assert json.loads((out / "index.json").read_text()) == whole and len(whole["shards"]) > 3
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "whole"))  # no temp file left
    for entry in whole["shards"]:
        assert (out / entry["file"]).read_bytes() == (tmp_path / "whole" / entry["file"]).read_bytes()


def test_globs_folders_and_skipped_files_are_logged(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = mixed_text_folder(tmp_path / "data")
    pq.write_table(pa.table({"text": ["from parquet", "second row"]}), data / "rows.parquet")
    proc = run_apr("tokenize", data, f"{data}/sub/*.txt", "-o", tmp_path / "out", "--tokenizer", TOKENIZER,
                   check=True)
    lines = proc.stderr.splitlines()
    used = sum(p.stat().st_size for p in data.rglob("*") if p.is_file() and p.suffix != ".csv")
    assert lines[0] == f"inputs: 4 file(s), {used:,} bytes, 2 skipped"
    assert f"skipped: {data / 'table.csv'}: unknown suffix '.csv'" in lines[1]
    assert lines[2] == f"skipped: {data / 'sub' / 'a.txt'}: listed twice"
    assert lines[3].startswith("documents: each ends with <|im_end|> (id ")
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal
    assert "5 documents in 1 shard(s)" in proc.stdout
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [os.path.basename(i["path"]) for i in index["inputs"]] == ["README.md", "b.TXT", "rows.parquet", "a.txt"]
    assert [s["reason"] for s in index["skipped"]][1] == "listed twice"


def test_pretrain_on_a_text_folder_logs_files_skipped_files_and_the_document_end(tmp_path):
    data = mixed_text_folder(tmp_path / "data")
    proc = run_apr("pretrain", "--arch", "tiny", "--data", data, "--tokenizer", TOKENIZER, "--out", tmp_path / "run",
                   "--check-only", "--seq-len", "4", "--batch-size", "2", "--val-fraction", "0.2", check=True)
    assert "inputs: 3 file(s), 29 bytes, 1 skipped\n" in proc.stderr
    assert f"skipped: {data / 'table.csv'}: unknown suffix '.csv'" in proc.stderr
    assert "documents: each ends with <|im_end|> (id " in proc.stderr
    assert "fit 1 validation window(s) of 5 tokens, not the 16 asked" in proc.stderr  # tiny data, warned


def test_pretrain_reads_shards_by_folder_glob_and_index(tmp_path):
    run_apr("tokenize", FIXTURES / "tiny-corpus.txt", "-o", tmp_path / "tok", "--tokenizer", TOKENIZER,
            "--shard-tokens", "500", "-q", check=True)
    counts = set()
    for data in (tmp_path / "tok", tmp_path / "tok" / "index.json", f"{tmp_path}/tok/tokens-*.bin"):
        proc = run_apr("pretrain", "--arch", "tiny", "--data", data, "--out", tmp_path / "run", "--check-only",
                       "--seq-len", "64", "--batch-size", "4", "--json", check=True)
        counts.add(json.loads(proc.stdout)["train_tokens"])
    assert len(counts) == 1


def test_tokenizer_without_eos_and_empty_text_are_refused(tmp_path):
    from tokenizers import Tokenizer

    path = build_bpe_tokenizer(tmp_path / "with-eos.json", "gpt2")
    tok = Tokenizer.from_file(str(path))
    data = json.loads(tok.to_str())
    data["added_tokens"] = []
    data["model"]["vocab"] = {k: v for k, v in data["model"]["vocab"].items() if k != "<|endoftext|>"}
    (tmp_path / "no-eos.json").write_text(json.dumps(data))
    (tmp_path / "a.txt").write_text("some text\n")
    proc = run_apr("tokenize", tmp_path / "a.txt", "-o", tmp_path / "out", "--tokenizer", tmp_path / "no-eos.json")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"apr: error: {tmp_path / 'no-eos.json'}: has no end-of-text token, so documents would run together; "
        "pass --no-separator to join them anyway")
    ok = run_apr("tokenize", tmp_path / "a.txt", "-o", tmp_path / "out", "--tokenizer", tmp_path / "no-eos.json",
                 "--no-separator", check=True)
    assert "documents: joined WITHOUT a separator" in ok.stderr
    (tmp_path / "empty.txt").write_text("")
    empty = run_apr("tokenize", tmp_path / "empty.txt", "-o", tmp_path / "none", "--tokenizer", TOKENIZER, "-q")
    assert empty.returncode == 2 and empty.stderr.strip() == \
        f"apr: error: {tmp_path / 'empty.txt'}: holds no text (0 tokens); nothing written"
    assert not (tmp_path / "none").exists()
