"""DDP on CPU: `torchrun --nproc_per_node 2` (gloo) trains like one process with the same global batch."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr, save_apr
from apr_testing import apr_env, learnable_tokens, read_metrics, run_apr, torchrun, torchrun_command
from apr_trainer.data import write_token_file
from apr_trainer.model import DecoderLM
from apr_trainer.presets import preset

FLAGS = ["--steps", "6", "--batch-size", "8", "--grad-accum", "2", "--seq-len", "32", "--lr", "3e-3",
         "--warmup", "2", "--val-every", "3", "--save-every", "3", "--device", "cpu", "--log-every", "1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A tiny tied Llama .apr (f32) and a learnable token file."""
    import torch

    root = tmp_path_factory.mktemp("ddp")
    config = preset("tiny")
    torch.manual_seed(0)
    save_apr(root / "model.apr", DecoderLM(config).state_dict(), config.to_metadata())
    write_token_file(root / "tokens.bin", [learnable_tokens(20_000, 512, step=5, offset=1, noise=4)], 512)
    return root


def test_two_gloo_processes_match_one_process(inputs, tmp_path):
    data = ["--init", inputs / "model.apr", "--data", inputs / "tokens.bin", *FLAGS]
    run_apr("pretrain", *data, "--out", tmp_path / "one", check=True)
    proc = torchrun("pretrain", *data, "--out", tmp_path / "two", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # one JSON document: only rank 0 prints
    assert summary["world_size"] == 2
    assert proc.stderr.count("step 0 (before any update)") == 1  # only rank 0 logs
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == list(range(7))  # only rank 0 writes
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (a["step"], key)
    state = json.loads((tmp_path / "two" / "checkpoints" / "step-000006.state.json").read_text())
    digests = state["replica_sha256"]
    assert state["world_size"] == 2 and len(digests) == 2 and digests[0] == digests[1]
    assert summary["replica_sha256"] == digests
    with open_apr(tmp_path / "one" / "final.apr") as f, open_apr(tmp_path / "two" / "final.apr") as g:
        assert f.keys() == g.keys()
        for name in f.keys():
            np.testing.assert_allclose(g[name], f[name], atol=1e-5)


def test_batch_that_does_not_split_over_ranks_is_refused(inputs, tmp_path):
    proc = torchrun("pretrain", "--init", inputs / "model.apr", "--data", inputs / "tokens.bin", "--out",
                    tmp_path / "run", "--batch-size", "3", "--device", "cpu")
    assert proc.returncode != 0
    assert "--batch-size: 3 sequences per micro-step cannot be split evenly over 2 processes" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_to_torchrun_saves_on_every_rank_and_resume_continues_exactly(inputs, tmp_path):
    """torchrun forwards SIGTERM to its workers: they agree to stop after the same step and write one complete
    checkpoint (each worker exits 143; torchrun itself exits 1 on its SignalException); `--resume` under
    torchrun gives the uninterrupted 2-process curve exactly."""
    data = ["--init", inputs / "model.apr", "--data", inputs / "tokens.bin", *FLAGS, "--steps", "40",
            "--save-every", "4", "--val-every", "4"]
    assert torchrun("pretrain", *data, "--out", tmp_path / "reference").returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_command("pretrain", *data, "--out", run), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=apr_env())
    first = run / "checkpoints" / "step-000004.state.json"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent, which forwards it to both workers
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stderr[-3000:]  # torchrun itself ends on its SignalException (exit 1)
    stopped_at = read_metrics(run)[-1]["step"]
    assert 4 <= stopped_at < 40 and not (run / "final.apr").exists()
    assert f"apr: stopped by SIGTERM at step {stopped_at}" in stderr, stderr[-3000:]
    assert "pretrain --resume" in stderr
    state = json.loads((run / "checkpoints" / f"step-{stopped_at:06d}.state.json").read_text())
    assert state["step"] == stopped_at and state["world_size"] == 2
    resumed = torchrun("pretrain", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = read_metrics(tmp_path / "reference"), read_metrics(run)
    assert [r["step"] for r in got] == list(range(41))
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "val_loss", "lr", "grad_norm", "tokens_seen", "skipped_steps"):
            assert a.get(key) == b.get(key), (a["step"], key)  # bit-identical: same layout, same order of sums
    with open_apr(tmp_path / "reference" / "final.apr") as f, open_apr(run / "final.apr") as g:
        assert all(np.array_equal(f[n], g[n]) for n in f.keys())
