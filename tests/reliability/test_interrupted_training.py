"""kill -9 (or SIGTERM) a real `apr pretrain` after its first checkpoint, `--resume` it: the loss curve,
learning rates, gradient norms and final weights are those of the uninterrupted run with the same seed."""

from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr

from apr_testing import popen_apr, read_metrics, run_apr, tiny_training_inputs


STEPS = 16
FLAGS = ["--steps", str(STEPS), "--save-every", "4", "--val-every", "4", "--grad-accum", "2", "--seq-len", "32",
         "--batch-size", "4", "--val-batches", "2", "--warmup", "3", "--lr", "3e-3", "--seed", "3",
         "--device", "cpu", "-q"]
TOLERANCE = 1e-6  # same process layout, one thread: the curves are in fact bit-identical


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """--init weights (the tiny preset), a token file, and the uninterrupted reference run."""
    root = tmp_path_factory.mktemp("interrupt")
    tiny_training_inputs(root, 30_000)
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


def stop_after_first_checkpoint(setup: dict[str, Path], run: Path, sig: signal.Signals) -> tuple[int, str]:
    """Start a run, send `sig` once its first checkpoint is complete; returns its exit code and stderr."""
    proc = popen_apr("pretrain", "--init", setup["root"] / "init.apr", "--data", setup["root"] / "tokens.bin",
                     "--out", run, *FLAGS, capture=True)
    first = run / "checkpoints" / "step-000004.state.json"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.0005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_the_step_reached_and_resume_continues_the_curve(setup, tmp_path, sig):
    run = tmp_path / "run"
    code, stderr = stop_after_first_checkpoint(setup, run, sig)
    assert code == 128 + sig, stderr
    last = stderr.strip().splitlines()[-1]  # one line, shown despite -q: where the checkpoint is, how to go on
    stopped_at = read_metrics(run)[-1]["step"]
    assert 4 <= stopped_at < STEPS and not (run / "final.apr").exists()
    ckpt = run / "checkpoints" / f"step-{stopped_at:06d}.apr"
    assert last == (f"apr: stopped by {sig.name} at step {stopped_at}: checkpoint {ckpt}; "
                    f"continue with: apr pretrain --resume {run}"), stderr
    state = json.loads((run / "checkpoints" / f"step-{stopped_at:06d}.state.json").read_text())
    assert state["step"] == stopped_at and state["data"]["next_step"] == stopped_at
    proc = run_apr("pretrain", "--resume", run)
    assert proc.returncode == 0, proc.stderr
    assert f"resume: step {stopped_at};" in proc.stderr
    assert_same_curve(setup["reference"], run)


def test_second_signal_during_the_save_aborts_it_and_keeps_the_previous_checkpoint(setup, tmp_path):
    """The save of the stop checkpoint is slowed (a test prelude) so that a second SIGTERM lands inside it."""
    run = tmp_path / "run"
    prelude = (
        "import os, signal, time\n"
        "from apr_trainer import checkpoint\n"
        "_save = checkpoint.save_state\n"
        "def slow(path, *a, **k):\n"
        "    if os.path.exists(os.environ['STOP_MARK']):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"  # the second signal, while the stop checkpoint is written
        "        time.sleep(5)\n"
        "    return _save(path, *a, **k)\n"
        "checkpoint.save_state = slow\n"
    )
    mark = tmp_path / "stop-mark"
    proc = run_apr("pretrain", "--init", setup["root"] / "init.apr", "--data", setup["root"] / "tokens.bin",
                   "--out", run, *FLAGS, "--save-every", "2",
                   prelude=prelude + f"import threading\n"
                   f"def later():\n"
                   f"    while not os.path.exists({str(run / 'checkpoints' / 'step-000002.state.json')!r}):\n"
                   f"        time.sleep(0.001)\n"
                   f"    open({str(mark)!r}, 'w').close()\n"
                   f"    os.kill(os.getpid(), signal.SIGTERM)\n"
                   f"threading.Thread(target=later, daemon=True).start()\n"
                   f"os.environ['STOP_MARK'] = {str(mark)!r}\n")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "aborted by a second signal while writing the checkpoint of step" in proc.stderr
    assert "Traceback" not in proc.stderr
    complete = sorted(p.name for p in (run / "checkpoints").glob("*.state.json"))
    assert complete and complete[-1] == "step-000002.state.json", complete  # the previous one, whole
    assert not list((run / "checkpoints").glob(".*")), "a temp file of the aborted save was left"
    proc = run_apr("pretrain", "--resume", run)
    assert proc.returncode == 0 and "resume: step 2;" in proc.stderr, proc.stderr
