"""`apr convert`, `apr export`, `apr diff` run as the installed CLI in subprocesses."""

from __future__ import annotations

import json
import shutil
import subprocess

from apr_testing import APR_COMMAND, FIXTURES, run_apr, run_apr_json


def test_convert_export_diff_on_the_checked_in_fixture(tmp_path):
    apr, out = tmp_path / "tiny.apr", tmp_path / "hf"
    proc = run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", apr, check=True)
    assert proc.stdout.startswith(f"wrote {apr}") and "checked against the qwen2 table" in proc.stdout
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    run_apr("export", apr, "-o", out, check=True)
    for src in (FIXTURES / "tiny-qwen2-hf").iterdir():
        assert (out / src.name).read_bytes() == src.read_bytes(), src.name
    proc = run_apr("diff", FIXTURES / "tiny-qwen2-hf", apr)
    assert proc.returncode == 0 and "result: identical" in proc.stdout and "copy of" in proc.stdout


def test_convert_json_report_and_quiet(hf_qwen2, tmp_path):
    report = run_apr_json("convert", hf_qwen2, "-o", tmp_path / "q.apr", "--dtype", "bf16")
    assert report["tensor_count"] == 27 and report["dtypes"] == {"bf16": 27} and report["lm_head_copy"] is True
    proc = run_apr("convert", hf_qwen2, "-o", tmp_path / "n.apr", "--no-lm-head-copy", "--quiet", check=True)
    assert proc.stdout == "" and proc.stderr == ""
    assert run_apr_json("inspect", tmp_path / "n.apr")  # inspect reads what convert wrote


def test_errors_are_one_line_with_exit_2(hf_llama, tmp_path):
    dst = tmp_path / "l.apr"
    run_apr("convert", hf_llama, "-o", dst, check=True)
    proc = run_apr("convert", hf_llama, "-o", dst)
    assert proc.returncode == 2
    assert proc.stderr == f"apr: error: {dst}: already exists (use --force to overwrite)\n"
    broken = tmp_path / "broken"
    shutil.copytree(hf_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    config["vocab_size"] = 999
    (broken / "config.json").write_text(json.dumps(config))
    proc = run_apr("convert", broken, "-o", tmp_path / "b.apr")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "tensor 'lm_head.weight' has shape [320, 64] but the llama config needs [999, 64]" in proc.stderr
    assert not (tmp_path / "b.apr").exists()
    proc = run_apr("convert", hf_llama, "-o", tmp_path / "k.apr", "--keep-quant")
    assert proc.returncode == 2 and f"apr: error: --keep-quant: does not apply to HF input ({hf_llama})" in proc.stderr


def test_export_formats_and_stdout(hf_qwen2, tmp_path):
    apr = tmp_path / "q.apr"
    run_apr("convert", hf_qwen2, "-o", apr, check=True)
    original = (hf_qwen2 / "model.safetensors").read_bytes()
    raw = subprocess.run([*APR_COMMAND, "export", str(apr), "-o", "-"], capture_output=True, check=True)
    assert raw.stdout == original  # the safetensors bytes on stdout, the summary on stderr
    assert "left out lm_head.weight" in raw.stderr.decode()
    report = run_apr_json("export", apr, "-o", tmp_path / "m.safetensors")
    assert report["dropped"] == ["lm_head.weight"] and (tmp_path / "m.safetensors").read_bytes() == original
    report = run_apr_json("export", apr, "-o", tmp_path / "sharded", "--max-shard-size", "100KB")
    assert "model.safetensors.index.json" in report["files"]
    proc = run_apr("export", apr, "-o", tmp_path / "sharded")
    assert proc.returncode == 2 and "use --force to replace it" in proc.stderr


def test_diff_exit_status_and_json(hf_qwen2, hf_llama):
    proc = run_apr("diff", hf_qwen2, hf_llama, "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["identical"] is False and data["difference_count"] > 0 and data["only_in_b"] == ["lm_head.weight"]
    proc = run_apr("diff", hf_qwen2, hf_llama)
    assert proc.returncode == 1 and "result: different" in proc.stdout and "only in A" in proc.stdout
    proc = run_apr("diff", hf_qwen2, hf_qwen2, "--quiet")
    assert proc.returncode == 0 and proc.stdout == ""
