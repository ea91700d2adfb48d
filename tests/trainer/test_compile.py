"""`apr pretrain --compile` (torch.compile, inductor on the CPU) trains the curve of the eager run, in one
process and under FSDP on 2 gloo processes: real runs, the same command users type. On CUDA (device
machine): FSDP + compile under bf16-mixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apr_testing import read_metrics, run_apr, torchrun, tiny_training_inputs

FLAGS = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "1", "--val-every", "2",
         "--val-batches", "2", "--device", "cpu", "--log-every", "1", "--json", "-q"]
# Fused kernels sum in another order than eager ones: equal to a few float32 ulps, not bit for bit.
TOLERANCE = dict(rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("compile")
    init, tokens = tiny_training_inputs(root)
    args = ["pretrain", "--init", init, "--data", tokens, *FLAGS]
    eager = run_apr(*args, "--out", root / "eager")
    assert eager.returncode == 0, eager.stderr
    return root, args


def assert_same_curve(expected: Path, got: Path) -> None:
    a, b = read_metrics(expected), read_metrics(got)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], **TOLERANCE), (x["step"], key, x[key], y[key])


def test_compiled_single_process_run_follows_the_eager_curve(inputs):
    root, args = inputs
    proc = run_apr(*args, "--out", root / "compiled", "--compile")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["final_val_loss"] < json.loads(proc.stdout)["start_val_loss"]
    assert_same_curve(root / "eager", root / "compiled")


def test_compiled_fsdp_run_on_two_processes_follows_the_eager_curve(inputs):
    root, args = inputs
    proc = torchrun(*args, "--out", root / "fsdp-compiled", "--strategy", "fsdp", "--compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["strategy"], summary["world_size"]) == ("fsdp", 2)
    assert_same_curve(root / "eager", root / "fsdp-compiled")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fsdp_on_cuda_under_bf16_mixed_learns(inputs):
    root, args = inputs
    on_gpu = ["cuda" if a == "cpu" else a for a in args]
    proc = run_apr(*on_gpu, "--out", root / "cuda-fsdp-compiled", "--strategy", "fsdp", "--compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert (summary["strategy"], summary["precision"], summary["world_size"]) == ("fsdp", "bf16-mixed", 1)
    assert summary["final_val_loss"] < summary["start_val_loss"], summary
