"""kill -9 a real `apr pretrain` after its first checkpoint, `--resume` it: the loss curve, learning rates,
gradient norms and final weights are those of the uninterrupted run with the same seed."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr, save_apr
from apr_trainer.data import write_token_file
from apr_trainer.model import DecoderLM
from apr_trainer.presets import preset

from apr_testing import learnable_tokens, popen_apr, read_metrics, run_apr


STEPS = 16
FLAGS = ["--steps", str(STEPS), "--save-every", "4", "--val-every", "4", "--grad-accum", "2", "--seq-len", "32",
         "--batch-size", "4", "--val-batches", "2", "--warmup", "3", "--lr", "3e-3", "--seed", "3",
         "--device", "cpu", "-q"]
TOLERANCE = 1e-6  # same process layout, one thread: the curves are in fact bit-identical


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """--init weights (the tiny preset), a token file, and the uninterrupted reference run."""
    import torch

    root = tmp_path_factory.mktemp("interrupt")
    torch.manual_seed(0)
    save_apr(root / "init.apr", DecoderLM(preset("tiny")).state_dict(), preset("tiny").to_metadata())
    write_token_file(root / "tokens.bin", [learnable_tokens(30_000, 512, step=5, offset=1, noise=4)], 512)
    reference = root / "reference"
    proc = run_apr("pretrain", "--init", root / "init.apr", "--data", root / "tokens.bin", "--out", reference, *FLAGS)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "reference": reference}


def kill_after_first_checkpoint(setup: dict[str, Path], run: Path) -> None:
    proc = popen_apr("pretrain", "--init", setup["root"] / "init.apr", "--data", setup["root"] / "tokens.bin",
                     "--out", run, *FLAGS)
    first = run / "checkpoints" / "step-000004.state.json"  # written last: the checkpoint is complete
    while not first.exists() and proc.poll() is None:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not (run / "final.apr").exists() and len(read_metrics(run)) < STEPS + 1


def assert_same_curve(reference: Path, run: Path) -> None:
    expected, got = read_metrics(reference), read_metrics(run)
    assert [r["step"] for r in got] == list(range(STEPS + 1))  # every step once: none lost, none repeated
    for a, b in zip(expected, got, strict=True):
        assert set(a) == set(b), (a, b)
        for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_seen"):
            if key in a:
                assert abs(a[key] - b[key]) <= TOLERANCE, (a["step"], key, a[key], b[key])
    with open_apr(reference / "final.apr") as f, open_apr(run / "final.apr") as g:
        assert f.keys() == g.keys() and all(np.array_equal(f[n], g[n]) for n in f.keys())


@pytest.fixture(scope="module")
def killed(setup) -> Path:
    """A run killed right after its first checkpoint (tests resume copies of it)."""
    run = setup["root"] / "killed"
    kill_after_first_checkpoint(setup, run)
    return run


def test_killed_run_resumes_on_the_uninterrupted_curve(setup, killed, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    proc = run_apr("pretrain", "--resume", run)
    assert proc.returncode == 0, proc.stderr
    resumed_at = int(proc.stderr.split("resume: step ")[1].split(";")[0])
    assert resumed_at >= 4 and resumed_at % 4 == 0, proc.stderr
    assert "optimizer, schedule, RNG and data position restored" in proc.stderr
    state = json.loads((run / "checkpoints" / f"step-{resumed_at:06d}.state.json").read_text())
    assert state["data"]["next_step"] == resumed_at and state["step"] == resumed_at
    assert_same_curve(setup["reference"], run)


def test_resume_survives_a_torn_last_metrics_line(setup, killed, tmp_path):
    """A full disk (or power loss) can cut metrics.jsonl mid-line; --resume must still continue the run."""
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 99, "loss": 1.')
    proc = run_apr("pretrain", "--resume", run)
    assert proc.returncode == 0, proc.stderr
    assert_same_curve(setup["reference"], run)
