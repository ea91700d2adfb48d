"""Non-finite steps in real `apr pretrain` runs: skipped on every rank alike and counted, repeated ones stop the
run with the last good checkpoint kept, no saved weight is ever NaN/Inf, metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr
from apr_testing import run_apr, tiny_training_inputs

FLAGS = ["--seq-len", "32", "--batch-size", "4", "--val-batches", "2", "--warmup", "2", "--lr", "3e-3",
         "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nonfinite")
    tiny_training_inputs(root)
    return root


def pretrain(inputs: Path, run: Path, *flags: str, poison: str | None = None):
    prelude = f"import os\nos.environ['APR_TEST_POISON_STEPS'] = {poison!r}" if poison else None
    return run_apr("pretrain", "--init", inputs / "init.apr", "--data", inputs / "tokens.bin", "--out", run,
                   *FLAGS, *flags, prelude=prelude)


def strict_records(run: Path) -> list[dict]:
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity fails here."""
    def refuse(constant: str) -> None:
        raise AssertionError(f"bare {constant} in metrics.jsonl")

    return [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_all_saved_weights_finite(run: Path) -> None:
    for path in [*run.glob("checkpoints/step-*.apr"), *run.glob("final.apr")]:
        with open_apr(path) as f:
            for name in f.keys():
                assert np.isfinite(np.asarray(f[name], dtype=np.float32)).all(), (path, name)


def test_a_poisoned_step_is_skipped_counted_and_leaves_weights_and_moments_alone(inputs, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(inputs, run, "--steps", "5", "--save-every", "1", "--json", poison="3")
    assert proc.returncode == 0, proc.stderr
    records = strict_records(run)
    third = records[3]
    assert third["step"] == 3 and third["skipped"] is True and third["skipped_steps"] == 1
    assert third["loss"] is None and third["loss_nonfinite"] == "nan"
    assert [r.get("skipped_steps") for r in records[1:]] == [0, 0, 1, 1, 1]
    assert "SKIPPED (non-finite loss or gradient norm; 1 so far)" in proc.stderr
    assert json.loads(proc.stdout)["skipped_steps"] == 1
    assert records[5]["loss"] is not None and np.isfinite(records[5]["loss"])  # training went on
    ckpt = run / "checkpoints"
    with open_apr(ckpt / "step-000002.apr") as before, open_apr(ckpt / "step-000003.apr") as after:
        assert all(np.array_equal(before[n], after[n]) for n in before.keys())  # no update at the skipped step
    from safetensors.numpy import load_file

    moments_before = load_file(ckpt / "step-000002.state.safetensors")
    moments_after = load_file(ckpt / "step-000003.state.safetensors")
    optim = [k for k in moments_before if k.startswith("optim.")]
    assert optim and all(np.array_equal(moments_before[k], moments_after[k]) for k in optim)
    state = json.loads((ckpt / "step-000003.state.json").read_text())
    assert state["skipped_steps"] == 1 and state["loss"] is None
    assert_all_saved_weights_finite(run)


def test_repeated_poisoning_stops_with_one_line_and_keeps_the_last_good_checkpoint(inputs, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(inputs, run, "--steps", "12", "--save-every", "4", "--max-skipped-steps", "3",
                    poison="5,6,7,8")
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("apr: error: --max-skipped-steps: 3 consecutive steps (up to step 7) had a non-finite")
    assert str(run / "checkpoints" / "step-000004.apr") in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("*.state.json")) == ["step-000004.state.json"]
    assert not (run / "final.apr").exists()
    assert [r["step"] for r in strict_records(run)] == list(range(8))
    resumed = run_apr("pretrain", "--resume", run)  # the kept checkpoint continues
    assert resumed.returncode == 0 and "resume: step 4;" in resumed.stderr, resumed.stderr
    assert_all_saved_weights_finite(run)


def test_a_save_that_would_hold_non_finite_weights_fails_clearly(inputs, tmp_path):
    """A huge lr makes the first update's weights finite in fp32 but past f16's range (Inf in an f16 file),
    while that step's loss and gradient were finite."""
    run = tmp_path / "run"
    proc = pretrain(inputs, run, "--steps", "3", "--save-every", "1", "--lr", "1e6", "--warmup", "0",
                    "--dtype", "f16")
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert line.startswith(f"apr: error: {run / 'checkpoints' / 'step-000001.apr'}: not written: weight ")
    assert "holds NaN or Inf as float16" in line
    assert not list((run / "checkpoints").glob("step-*"))


def test_a_diverging_run_never_writes_nan_and_metrics_stay_json(inputs, tmp_path):
    """Today's `--lr 1e6` case: it trained on NaN, saved NaN weights, then died on non-JSON metadata."""
    run = tmp_path / "run"
    proc = pretrain(inputs, run, "--steps", "12", "--save-every", "2", "--lr", "1e6", "--warmup", "0")
    assert "Traceback" not in proc.stderr and "JSON" not in proc.stderr
    records = strict_records(run)
    assert any(r.get("skipped") for r in records), records  # it did diverge
    if proc.returncode != 0:
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("apr: error: ")
    assert_all_saved_weights_finite(run)
