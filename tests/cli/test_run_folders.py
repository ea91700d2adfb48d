"""Run folders that can always be continued or replaced, and the other things a new user tripped over in
`apr pretrain` (issue 15): --out checked first, --force, --keep-last, warmup cap, tokenizer checks, lineage."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr, save_apr
from apr_testing import FIXTURES, learnable_tokens, popen_apr, read_metrics, run_apr
from apr_trainer.data import write_token_file
from apr_trainer.model import DecoderLM
from apr_trainer.presets import preset

SMALL = ["--seq-len", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu", "--warmup", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    import torch

    root = tmp_path_factory.mktemp("folders")
    torch.manual_seed(0)
    meta = {**preset("tiny").to_metadata(), "source": "/somewhere/hf-model", "created_at": "2020-01-01T00:00:00Z"}
    save_apr(root / "model.apr", DecoderLM(preset("tiny")).state_dict(), meta)
    write_token_file(root / "tokens.bin", [learnable_tokens(8_000, 512, step=5, offset=1, noise=4)], 512)
    return root


def pretrain(tiny: Path, out: Path, *flags: str, data: Path | None = None):
    return run_apr("pretrain", "--init", tiny / "model.apr", "--data", data or tiny / "tokens.bin", "--out", out,
                   *SMALL, *flags)


def test_a_run_folder_without_a_complete_checkpoint_is_reused(tiny, tmp_path):
    run = tmp_path / "run"
    assert pretrain(tiny, run, "--steps", "0").returncode == 0  # leaves run.json, metrics.jsonl, checkpoints/
    resumed = run_apr("pretrain", "--resume", run)
    assert resumed.returncode == 2
    assert "nothing to resume; run the same command without --resume" in resumed.stderr
    again = pretrain(tiny, run, "--steps", "2")  # was: "already holds a run, use --resume" (which failed too)
    assert again.returncode == 0, again.stderr
    assert "replacing the earlier run's files" in again.stderr
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2]  # the stale step-0 record is gone


def test_sigint_right_after_start_leaves_a_folder_that_works_again(tiny, tmp_path):
    """Ctrl-C as soon as the run folder exists: exit 130 and one line; the folder is then either reused by
    the same command (no step saved) or continued by --resume (a step finished first and was saved)."""
    run = tmp_path / "run"
    args = ["pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin", "--out", run, *SMALL,
            "--steps", "30", "--save-every", "0"]
    proc = popen_apr(*args, capture=True)
    while not (run / "run.json").exists() and proc.poll() is None:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip().splitlines()[-1].startswith("apr: stopped by SIGINT "), stderr
    complete = list((run / "checkpoints").glob("*.state.json"))
    again = run_apr(*(["pretrain", "--resume", run] if complete else args))
    assert again.returncode == 0, again.stderr
    assert (run / "final.apr").exists()


def test_a_finished_run_is_refused_unless_force(tiny, tmp_path):
    run = tmp_path / "run"
    assert pretrain(tiny, run, "--steps", "2").returncode == 0
    refused = pretrain(tiny, run, "--steps", "1")
    assert refused.returncode == 2 and "--resume" in refused.stderr and "--force" in refused.stderr
    replaced = pretrain(tiny, run, "--steps", "1", "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert [r["step"] for r in read_metrics(run)] == [0, 1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000001.apr", "step-000001.state.json", "step-000001.state.safetensors"]


def test_out_problems_are_found_before_loading_and_by_check_only(tiny, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    missing = tmp_path / "missing.bin"  # loading the data would fail: the --out error must come first
    for extra in ([], ["--check-only"]):
        proc = pretrain(tiny, a_file, *extra, data=missing)
        assert proc.returncode == 2
        assert proc.stderr.strip() == f"apr: error: {a_file}: is a file, not a run folder: choose another --out"
    finished = tmp_path / "run"
    assert pretrain(tiny, finished, "--steps", "1").returncode == 0
    proc = pretrain(tiny, finished, "--check-only")
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


def test_keep_last_prunes_intermediate_checkpoints_and_logs_each_save(tiny, tmp_path):
    run = tmp_path / "run"
    proc = pretrain(tiny, run, "--steps", "6", "--save-every", "2", "--keep-last", "1")
    assert proc.returncode == 0, proc.stderr
    ckpt = run / "checkpoints"
    assert f"saved {ckpt / 'step-000002.apr'}" in proc.stderr
    assert f"saved {ckpt / 'step-000004.apr'}; removed step-000002.apr (--keep-last 1)" in proc.stderr
    assert "removed step-000004.apr (--keep-last 1)" in proc.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "step-000006.apr", "step-000006.state.json", "step-000006.state.safetensors"]
    with open_apr(run / "final.apr") as f:
        assert f.metadata["training"]["step"] == 6


def test_warmup_longer_than_the_run_is_capped_and_said(tiny, tmp_path):
    run = tmp_path / "run"
    proc = run_apr("pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin", "--out", run,
                   "--seq-len", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu",
                   "--steps", "20", "--lr", "1e-3")  # default --warmup 100
    assert proc.returncode == 0, proc.stderr
    assert ("warning: --warmup 100 would not end within --steps 20, so the peak --lr 0.001 would never be "
            "reached: warming up over 2 steps (10% of the run)") in proc.stderr
    lrs = [r["lr"] for r in read_metrics(run)[1:]]
    assert max(lrs) == pytest.approx(1e-3)
    assert json.loads((run / "run.json").read_text())["warmup"] == 2


def test_checkpoints_get_their_own_created_at_and_lineage_under_training(tiny, tmp_path):
    run = tmp_path / "run"
    assert pretrain(tiny, run, "--steps", "1").returncode == 0
    with open_apr(run / "final.apr") as f:
        meta = f.metadata
    assert meta["created_at"] != "2020-01-01T00:00:00Z" and "source" not in meta
    assert meta["training"]["lineage"] == {"init": str(tiny / "model.apr"), "init_step": None,
                                           "init_source": "/somewhere/hf-model", "init_original_format": None,
                                           "init_created_at": "2020-01-01T00:00:00Z"}


def test_a_tokenizer_other_than_the_init_ones_is_warned_about_or_refused(tmp_path):
    from tokenizers import Tokenizer

    model = tmp_path / "tiny.apr"
    run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", model, check=True)
    other = Tokenizer.from_file(str(FIXTURES / "tiny-qwen2-hf" / "tokenizer.json"))
    spec = json.loads(other.to_str())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same tokens, two ids swapped: another tokenizer
    (tmp_path / "other.json").write_text(json.dumps(spec))
    flags = ["--init", model, "--data", FIXTURES / "tiny-corpus.txt", "--tokenizer", tmp_path / "other.json",
             "--steps", "1", "--seq-len", "32", "--batch-size", "2", "--val-batches", "1", "--device", "cpu"]
    warned = run_apr("pretrain", *flags, "--out", tmp_path / "warned")
    assert warned.returncode == 0, warned.stderr
    assert (f"warning: --tokenizer: {tmp_path / 'other.json'} is not the tokenizer carried in {model}"
            in warned.stderr)
    refused = run_apr("pretrain", *flags, "--out", tmp_path / "refused", "--strict")
    assert refused.returncode == 2 and "--strict" in refused.stderr
    assert not (tmp_path / "refused").exists()
    same = run_apr("pretrain", *flags[:4], "--tokenizer", FIXTURES / "tiny-qwen2-hf" / "tokenizer.json",
                   *flags[6:], "--out", tmp_path / "same", "--strict")
    assert same.returncode == 0 and "is not the tokenizer" not in same.stderr, same.stderr


def test_the_summary_table_ends_a_finished_run(tiny, tmp_path):
    proc = pretrain(tiny, tmp_path / "run", "--steps", "2")
    assert proc.returncode == 0
    table = proc.stderr.splitlines()[-7:]
    assert table[0] == "run summary:"
    assert table[1].split() == ["steps", "0", "->", "2"] and table[5].split() == ["skipped", "steps", "0"]
    assert table[6].split() == ["final", str(tmp_path / "run" / "final.apr")]
    assert np.isfinite(float(table[3].split()[-1].replace(",", "")))


def test_tensorboard_events_hold_the_metrics_and_its_absence_is_one_line(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert pretrain(tiny, run, "--steps", "3", "--tensorboard").returncode == 0
    events = EventAccumulator(str(run))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in read_metrics(run)[1:]]
    assert [s for s, _ in losses] == [s for s, _ in expected]
    assert all(v == pytest.approx(w, rel=1e-6) for (_, v), (_, w) in zip(losses, expected, strict=True))
    absent = run_apr("pretrain", "--init", tiny / "model.apr", "--data", tiny / "tokens.bin", "--out",
                     tmp_path / "no-tb", *SMALL, "--tensorboard", prelude="import sys\nsys.modules['tensorboard'] = None")
    assert absent.returncode == 2
    assert absent.stderr.strip() == ("apr: error: --tensorboard: needs the tensorboard package: "
                                     "pip install 'apr-toolkit[tensorboard]'")


def test_a_resumed_run_replaces_the_tensorboard_points_past_its_checkpoint(tiny, tmp_path):
    """Events logged after the checkpoint a run resumes from are purged (TensorBoard's purge_step), so
    each step has one point, as in metrics.jsonl, not the interrupted run's and the resumed run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert pretrain(tiny, run, "--steps", "4", "--save-every", "2", "--tensorboard").returncode == 0
    for late in [run / "final.apr", *run.glob("checkpoints/step-000004.*")]:  # as if stopped after step 4's log
        late.unlink()
    resumed = run_apr("pretrain", "--resume", run)
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: step 2;" in resumed.stderr
    events = EventAccumulator(str(run))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [r["step"] for r in read_metrics(run)[1:]] == [1, 2, 3, 4]
