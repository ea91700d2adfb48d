"""`apr run` and `apr eval` as the installed CLI, against transformers on the same fp32 weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from apr_trainer.data import write_token_file

from apr_testing import (
    FIXTURES, build_hf_checkpoint, build_hf_checkpoint_with_tokenizer, learnable_tokens, one_line_error, run_apr,
    run_apr_json, transformers_greedy, transformers_loss,
)

PROMPT = "the cat sat on the mat and"
CORPUS = FIXTURES / "tiny-corpus.txt"
INJECTION = "{{ cycler.__init__.__globals__.os.popen('touch %s').read() }}"


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder with the tiny tokenizer, the same model converted by `apr convert`)."""
    work = tmp_path_factory.mktemp(request.param)
    folder = build_hf_checkpoint_with_tokenizer(work / "hf", request.param, seed=1)
    run_apr("convert", folder, "-o", work / "m.apr", "--quiet", check=True)
    return folder, work / "m.apr"


def hf_greedy(folder: Path, prompt_ids: list[int], n: int, eos: int | None = None) -> list[int]:
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return transformers_greedy(reference, prompt_ids, n, eos_token_id=eos)


def hf_perplexity(folder: Path, ids: list[int], seq_len: int) -> tuple[float, int]:
    """The issue's definition computed with transformers: (perplexity, predicted tokens)."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loss, windows = transformers_loss(reference, ids, seq_len)
    return math.exp(loss), windows * (seq_len - 1)


def refused(proc, *fragments: str) -> None:
    """Exit 2, nothing on stdout, one `apr: error:` line holding every fragment."""
    line = one_line_error(proc)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    for fragment in fragments:
        assert fragment in line, line


def test_run_greedy_equals_transformers_for_20_tokens(model):
    folder, apr = model
    prompt_ids = transformers.AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids
    result = run_apr_json("run", apr, "-p", PROMPT, "-n", "20", "--ignore-eos", "--device", "cpu")
    assert result["tokens"] == hf_greedy(folder, prompt_ids, 20)
    assert result["token_count"] == 20 and result["prompt"] == PROMPT and result["tokens_per_s"] > 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    assert result["text"] == tokenizer.decode(result["tokens"], skip_special_tokens=True)
    streamed = run_apr("run", folder, "-p", PROMPT, "-n", "20", "--ignore-eos", check=True)  # HF folder input
    assert streamed.stdout == result["text"] + "\n"


def test_run_stops_at_eos_unless_ignore_eos(model):
    folder, apr = model
    eos = transformers.AutoTokenizer.from_pretrained(folder).eos_token_id
    prompt_ids = transformers.AutoTokenizer.from_pretrained(folder)(PROMPT).input_ids
    free = run_apr_json("run", apr, "-p", PROMPT, "-n", "40", "--ignore-eos")["tokens"]
    stopped = run_apr_json("run", apr, "-p", PROMPT, "-n", "40")["tokens"]
    expected = free[: free.index(eos) + 1] if eos in free else free
    assert stopped == expected == hf_greedy(folder, prompt_ids, 40, eos=eos)


def test_eval_equals_transformers_perplexity(model):
    folder, apr = model
    ids = transformers.AutoTokenizer.from_pretrained(folder)(CORPUS.read_text(), add_special_tokens=False).input_ids
    expected, predicted = hf_perplexity(folder, ids, 64)
    result = run_apr_json("eval", apr, "--data", CORPUS, "--seq-len", "64", "--batch-size", "16")
    assert set(result) == {"perplexity", "loss", "tokens", "windows", "seq_len", "model", "data"}
    assert (result["tokens"], result["windows"], result["seq_len"]) == (predicted, len(ids) // 64, 64)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert result["loss"] == pytest.approx(math.log(expected), rel=1e-4)


def test_eval_on_a_token_file_needs_no_tokenizer(hf_qwen2, tmp_path):
    ids = learnable_tokens(1000, 300)
    write_token_file(tmp_path / "t.bin", [ids], vocab_size=300)
    expected, _ = hf_perplexity(hf_qwen2, ids.tolist(), 100)
    result = run_apr_json("eval", hf_qwen2, "--data", tmp_path / "t.bin", "--seq-len", "100", "--max-tokens", "1000")
    assert result["windows"] == 10 and result["perplexity"] == pytest.approx(expected, rel=1e-4)
    proc = run_apr("eval", hf_qwen2, "--data", tmp_path / "t.bin")  # default 512 > the tiny context: said
    assert proc.returncode == 0 and "apr: warning: --seq-len 128: the context of" in proc.stderr


def test_chat_renders_the_template_like_transformers():
    folder = FIXTURES / "tiny-qwen2-hf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "Hi there"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    result = run_apr_json("run", folder, "--chat", "-p", "Hi there", "-n", "8", "--ignore-eos")
    assert result["prompt"] == rendered
    chat_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert result["tokens"] == hf_greedy(folder, chat_ids, 8)


def test_hostile_chat_template_cannot_reach_python(tmp_path):
    folder = build_hf_checkpoint_with_tokenizer(tmp_path / "hostile", "qwen2")
    marker = tmp_path / "pwned"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = INJECTION % marker
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    proc = run_apr("run", folder, "--chat", "-p", "hi", "-n", "2")
    refused(proc, f"{folder}: chat template failed: SecurityError")
    assert not marker.exists()


def test_sampling_flags():
    apr = FIXTURES / "tiny-qwen2-hf"
    args = ("run", apr, "-p", PROMPT, "-n", "12", "--ignore-eos", "--temperature", "3", "--top-p", "0.95")
    first, again = run_apr_json(*args, "--seed", "5"), run_apr_json(*args, "--seed", "5")
    assert first["tokens"] == again["tokens"] and len(first["tokens"]) == 12
    greedy = run_apr_json("run", apr, "-p", PROMPT, "-n", "12", "--ignore-eos")
    top1 = run_apr_json("run", apr, "-p", PROMPT, "-n", "12", "--ignore-eos", "--temperature", "3", "--top-k", "1")
    assert top1["tokens"] == greedy["tokens"] != first["tokens"]


def test_bad_input_is_one_line(hf_qwen2, tmp_path):
    folder = build_hf_checkpoint_with_tokenizer(tmp_path / "q", "qwen2")
    bare = build_hf_checkpoint(tmp_path / "bare", "qwen2", vocab_size=512)  # no tokenizer, no chat template
    refused(run_apr("run", folder, "-p", "word " * 200, "-n", "4"),
                   "apr: error: --prompt: is 601 tokens, the context of", "is 128 tokens; shorten it")
    refused(run_apr("run", folder, "-p", "hi", "-n", "0"), "apr: error: -n: must be at least 1, got 0")
    refused(run_apr("run", folder, "-p", "hi", "--top-k", "3"), "--top-k: has no effect with greedy decoding")
    refused(run_apr("run", hf_qwen2, "-p", "hi"), f"{hf_qwen2}: carries no tokenizer; pass --tokenizer")
    refused(run_apr("eval", hf_qwen2, "--data", CORPUS), f"{hf_qwen2}: carries no tokenizer; pass --tokenizer")
    refused(run_apr("run", bare, "--chat", "-p", "hi", "--tokenizer", folder / "tokenizer.json"),
                   "carries no chat template")
    refused(run_apr("eval", folder, "--data", tmp_path / "nope.txt"), "nope.txt: No such file or directory")
    refused(run_apr("run", tmp_path / "missing.apr", "-p", "hi"), "missing.apr: No such file or directory")


def test_tokenizer_flag_supplies_a_missing_tokenizer(hf_qwen2, tmp_path):
    tokenizer = FIXTURES / "tiny-qwen2-hf" / "tokenizer.json"
    bare = build_hf_checkpoint(tmp_path / "bare", "qwen2", vocab_size=512)
    result = run_apr_json("run", bare, "-p", "hi", "-n", "3", "--ignore-eos", "--tokenizer", tokenizer)
    assert result["token_count"] == 3
    refused(run_apr("run", hf_qwen2, "-p", "hi", "--tokenizer", tokenizer),  # 400 tokens, 300 rows
                   "has 400 tokens", "but the model has only 300 embedding rows")


def test_an_encoder_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    for command in (("run", tmp_path / "bert", "-p", "hi"), ("eval", tmp_path / "bert", "--data", CORPUS)):
        refused(run_apr(*command), f"{tmp_path / 'bert'}: architecture 'bert' is not supported")
    assert list(tmp_path.iterdir()) == [tmp_path / "bert"]  # nothing written beside it


def test_a_killed_eval_leaves_no_converted_model_behind_for_long(tmp_path):
    """`apr eval` of an HF folder converts it to a temporary .apr in $TMPDIR; kill -9 cannot remove it,
    so the next command that converts one removes every such folder no living process holds."""
    import signal
    import time

    from apr_testing import popen_apr

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    marker = tmp_path / "converting"
    pause = ("from apr_format import tempfiles\n_make = tempfiles.create_temp_dir\n"
             "def paused(dest):\n    made = _make(dest)\n    import time, pathlib\n"
             f"    pathlib.Path({str(marker)!r}).touch()\n    time.sleep(120)\n    return made\n"
             "tempfiles.create_temp_dir = paused")
    args = ["eval", FIXTURES / "tiny-qwen2-hf", "--data", CORPUS, "--seq-len", "16", "--max-tokens", "64"]
    proc = popen_apr(*args, prelude=pause, env={"TMPDIR": str(scratch)})
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    left = [p.name for p in scratch.iterdir() if p.name.startswith(".apr-model.")]
    assert len(left) == 1 and (scratch / left[0]).is_dir(), left
    again = popen_apr(*args, env={"TMPDIR": str(scratch)}, capture=True)
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    assert [p.name for p in scratch.iterdir() if p.name.startswith(".apr-model.")] == []
