"""--resume restores everything (exact loss curve); --init restores weights only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from apr_format import open_apr
from apr_format.errors import CorruptSource, InvalidArgument
from apr_testing import apr_from_hf, build_hf_checkpoint, learnable_tokens, read_metrics, run_apr
from apr_trainer import checkpoint
from apr_trainer.config import TrainConfig
from apr_trainer.data import open_token_file, write_token_file
from apr_trainer.presets import preset
from apr_trainer.train import train

FLAGS = ["--seq-len", "32", "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3", "--warmup", "3",
         "--val-every", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny Qwen2 .apr (f32 and bf16) and a learnable token file."""
    root = tmp_path_factory.mktemp("resume")
    hf = build_hf_checkpoint(root / "hf", "qwen2")
    apr_from_hf(hf, root / "model.apr")
    apr_from_hf(hf, root / "model-bf16.apr", torch.bfloat16)
    write_token_file(root / "tokens.bin", [learnable_tokens(20_000, 300)], 300)
    return root


def _interrupt_after(run: Path, copy: Path, step: int) -> Path:
    """A copy of `run` as a crash after checkpoint `step` leaves it: later checkpoints lost or half-written."""
    shutil.copytree(run, copy)
    (copy / "final.apr").unlink()
    for path in (copy / "checkpoints").iterdir():
        if int(path.name[5:11]) > step and not path.name.endswith(".apr"):
            path.unlink()  # step-N.apr stays, without its state sidecars: an incomplete checkpoint
    return copy


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> Path:
    run = workdir / "full"
    run_apr("pretrain", "--init", workdir / "model.apr", "--data", workdir / "tokens.bin", "--out", run,
            "--steps", "12", "--save-every", "6", *FLAGS, check=True)
    return run


def test_resume_reproduces_the_uninterrupted_loss_curve(workdir, uninterrupted):
    broken = _interrupt_after(uninterrupted, workdir / "broken", 6)
    assert len(read_metrics(broken)) == 13  # the crashed run had logged past its last checkpoint
    proc = run_apr("pretrain", "--resume", broken, check=True)
    assert "resume: step 6; optimizer, schedule, RNG and data position restored" in proc.stderr
    expected, resumed = read_metrics(uninterrupted), read_metrics(broken)
    assert [r["step"] for r in resumed] == list(range(13))  # no duplicated steps 7..12
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "val_loss", "lr", "grad_norm"):
            assert (a.get(key) is None) == (b.get(key) is None)
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)
    with open_apr(uninterrupted / "final.apr") as f, open_apr(broken / "final.apr") as g:
        assert f.keys() == g.keys()
        assert all(np.array_equal(f[name], g[name]) for name in f.keys())


def test_shards_smaller_than_a_batch_train_and_resume_like_one_file(workdir, uninterrupted):
    """207 shards of 97 tokens (a batch is 8 x 33): the same windows, so the same curve, also after --resume."""
    tokens, _ = open_token_file(workdir / "tokens.bin")
    shards = workdir / "shards"
    shards.mkdir()
    for k, start in enumerate(range(0, len(tokens), 97)):
        write_token_file(shards / f"part-{k:05d}.bin", [tokens[start : start + 97]], 300)
    run = workdir / "sharded"
    run_apr("pretrain", "--init", workdir / "model.apr", "--data", shards, "--out", run,
            "--steps", "12", "--save-every", "6", *FLAGS, check=True)
    broken = _interrupt_after(run, workdir / "sharded-broken", 6)
    run_apr("pretrain", "--resume", broken, check=True)
    for got in (read_metrics(run), read_metrics(broken)):
        for a, b in zip(read_metrics(uninterrupted), got, strict=True):
            for key in ("loss", "val_loss"):
                assert (a.get(key) is None) == (b.get(key) is None)
                if a.get(key) is not None:
                    assert b[key] == pytest.approx(a[key], abs=1e-6), (a["step"], key)


def test_resume_keeps_exact_weights_behind_a_bf16_checkpoint(workdir, tmp_path):
    base = dict(init=str(workdir / "model-bf16.apr"), data=str(workdir / "tokens.bin"), steps=8, batch_size=8,
                seq_len=32, lr=3e-3, warmup=2, save_every=4, val_every=4, device="cpu")
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **base))
    with open_apr(full.final) as f:
        assert {t.dtype for t in f.tensors()} == {"bf16"}
    broken = _interrupt_after(Path(full.run_dir), tmp_path / "broken", 4)
    from apr_trainer.config import resume_config

    resumed = train(resume_config(broken, {}))
    assert resumed.start_step == 4 and "fp32 master weights" in resumed.weights
    for a, b in zip(read_metrics(Path(full.run_dir)), read_metrics(broken), strict=True):
        assert b.get("loss") == pytest.approx(a.get("loss"), abs=1e-6)


def test_resume_from_a_weights_only_file_is_refused(uninterrupted):
    proc = run_apr("pretrain", "--resume", uninterrupted / "final.apr")
    assert proc.returncode == 2
    assert "holds weights only: start a new run from it with --init" in proc.stderr


def test_resume_refuses_init_and_arch(workdir, uninterrupted):
    proc = run_apr("pretrain", "--resume", uninterrupted, "--init", workdir / "model.apr")
    assert proc.returncode == 2 and "--init: cannot be combined with --resume" in proc.stderr
    proc = run_apr("pretrain", "--init", workdir / "model.apr", "--arch", "tiny", "--data", workdir / "tokens.bin",
                   "--out", workdir / "never")
    assert proc.returncode == 2 and "--init: conflicts with --arch/--arch-config" in proc.stderr
    assert not (workdir / "never").exists()


def test_init_from_a_checkpoint_is_weights_only(workdir, uninterrupted, tmp_path):
    proc = run_apr("pretrain", "--init", uninterrupted / "final.apr", "--data", workdir / "tokens.bin",
                   "--out", tmp_path / "next", "--steps", "2", *FLAGS, check=True)
    assert "init: weights only -- fresh optimizer, schedule and data position, starting at step 0" in proc.stderr
    records = read_metrics(tmp_path / "next")
    previous = read_metrics(uninterrupted)[-1]
    assert records[0]["step"] == 0 and records[0]["val_loss"] == pytest.approx(previous["val_loss"], abs=1e-6)
    assert records[1]["lr"] == pytest.approx(3e-3 / 3)  # warmup starts again


def test_resume_picks_the_newest_complete_checkpoint(uninterrupted, tmp_path):
    assert checkpoint.resolve_resume(uninterrupted).name == "step-000012.apr"
    broken = _interrupt_after(uninterrupted, tmp_path / "b", 6)
    assert checkpoint.resolve_resume(broken).name == "step-000006.apr"
    with pytest.raises(InvalidArgument, match="no complete checkpoint"):
        checkpoint.resolve_resume(tmp_path)


def test_optimizer_state_round_trips_by_parameter_name():
    from apr_trainer.model import DecoderLM

    torch.manual_seed(0)
    model = DecoderLM(preset("tiny"))
    names = {p: n for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))).backward()
    opt.step()
    saved = checkpoint.optimizer_tensors(opt, names)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert checkpoint.restore_optimizer(fresh, names, saved, "x") == len(names)
    for p in model.parameters():
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh.state[p][field], opt.state[p][field])
    partial = {k: v for k, v in saved.items() if not k.startswith("optim.model.norm.weight.")}
    with pytest.raises(CorruptSource, match="lacks 1 parameters, e.g. 'model.norm.weight'"):
        checkpoint.restore_optimizer(torch.optim.AdamW(model.parameters()), names, partial, "x")
