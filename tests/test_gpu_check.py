"""`make gpu-check` on CPU with a tiny shape: every variant the GPU run measures trains in the same loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from apr_testing import ROOT, apr_env

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_every_variant_runs_on_a_tiny_shape_and_starts_from_the_same_loss(tmp_path):
    out, md = tmp_path / "gpu-check.json", tmp_path / "gpu-check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--steps", "1",
                           "--batch", "2", "--compile-backend", "aot_eager", "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, env=apr_env(), timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["variants"]}
    assert list(rows) == list(gpu_check.VARIANTS)
    reference = rows["Qwen2ForCausalLM"]["first_loss"]
    for name, row in rows.items():
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and row["peak_memory_gib"] > 0
        assert row["first_loss"] == pytest.approx(reference, abs=2e-2), name  # same weights, same batch, bf16
        assert row["master_dtype"] == "torch.float32"
    assert md.read_text().count("\n| ") == len(rows) + 2  # header, rule, one row per variant


def test_mfu_reference_for_the_qwen25_05b_shape():
    arch = gpu_check.qwen2_architecture(gpu_check.QWEN25_05B)
    per_token = gpu_check.flops_per_token(arch, gpu_check.SEQ)
    assert per_token == 6 * arch.param_count() + 12 * 24 * 896 * 2048  # tied: the head is the embedding
    assert 275_000 < 989e12 / per_token < 290_000  # the "100% MFU is about 280k tokens/s"
