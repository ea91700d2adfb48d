"""Preemption and non-finite steps on the CUDA path (bf16 autocast, fused AdamW, CUDA RNG state): the same
guarantees the CPU tests check, on a GPU. Skipped without CUDA; run on the device machine (`make gpu-check`)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from apr_format import open_apr

from apr_testing import popen_apr, read_metrics, run_apr, tiny_training_inputs

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 12
FLAGS = ["--steps", str(STEPS), "--save-every", "4", "--val-every", "4", "--seq-len", "64", "--batch-size", "8",
         "--val-batches", "2", "--warmup", "2", "--lr", "3e-3", "--seed", "3", "--device", "cuda", "-q"]
# Flash / memory-efficient attention backward kernels may sum in another order from run to run.
TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """--init weights, a token file and the uninterrupted reference run on the GPU."""
    root = tmp_path_factory.mktemp("cuda-survival")
    tiny_training_inputs(root, 40_000)
    reference = root / "reference"
    proc = run_apr("pretrain", "--init", root / "init.apr", "--data", root / "tokens.bin", "--out", reference, *FLAGS)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "reference": reference}


def test_sigterm_on_cuda_saves_the_step_reached_and_resume_continues_the_curve(inputs, tmp_path):
    run = tmp_path / "run"
    proc = popen_apr("pretrain", "--init", inputs["root"] / "init.apr", "--data", inputs["root"] / "tokens.bin",
                     "--out", run, *FLAGS, capture=True)
    first = run / "checkpoints" / "step-000004.state.json"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    stopped_at = read_metrics(run)[-1]["step"]
    assert f"apr: stopped by SIGTERM at step {stopped_at}: checkpoint" in stderr.strip().splitlines()[-1]
    resumed = run_apr("pretrain", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = read_metrics(inputs["reference"]), read_metrics(run)
    assert [r["step"] for r in got] == list(range(STEPS + 1))
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "val_loss", "lr"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOLERANCE, (a["step"], key, a[key], b[key])


def test_poisoned_steps_on_cuda_are_skipped_and_no_saved_weight_is_non_finite(inputs, tmp_path):
    run = tmp_path / "run"
    prelude = "import os\nos.environ['APR_TEST_POISON_STEPS'] = '3,4'"
    proc = run_apr("pretrain", "--init", inputs["root"] / "init.apr", "--data", inputs["root"] / "tokens.bin",
                   "--out", run, *FLAGS, prelude=prelude)
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(run)
    assert [r["step"] for r in records if r.get("skipped")] == [3, 4]
    assert records[-1]["skipped_steps"] == 2
    for path in [*run.glob("checkpoints/step-*.apr"), run / "final.apr"]:
        with open_apr(path) as f:
            assert all(np.isfinite(f.to_float32(name)).all() for name in f.keys()), path
