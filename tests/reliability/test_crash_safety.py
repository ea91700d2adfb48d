"""kill -9 at random moments during `apr convert`, `apr export` and a training checkpoint save.

After every kill the destination is absent, or the complete old file, or the complete new one: never
torn. Leftover temp files and folders are hidden, removed by the next write of the same destination
(the stale-temp policy of `apr_format.tempfiles`), and never stop the next run. Kill moments come from a seeded RNG: half are uniform over
the run's measured duration, half land while a temp file exists (mid-write). APR_CRASH_CASES sets the
kills per command (default 12; pretrain 10, each followed by a --resume).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr
from apr_format.atomic import exchange
from apr_format.validate import validate_file
from apr_trainer.data import write_token_file

from apr_testing import TEMP_NAME, env_cases, leftovers, popen_apr, read_metrics, record, run_apr, write_hf_folder


CASES = env_cases("APR_CRASH_CASES", 12)
TRAIN_CASES = max(3, CASES * 5 // 6)  # 10 by default: each costs a killed run and a resumed one
POLL = 0.0005  # seconds between looks at the output folder while waiting for a temp file
# Big enough that writing takes tens of milliseconds: 8192 x 512 embedding (16 MiB), one 512-wide layer.
BIG_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 512, "num_hidden_layers": 1,
    "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 1024, "vocab_size": 8192,
    "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "hidden_act": "silu", "torch_dtype": "float32",
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, str]:
    """Visible file name -> sha256 of a folder's files (our hidden temp names left out)."""
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if not TEMP_NAME.match(p.name)}


def kill_at_random(args: list, watch: Path, rng: random.Random, duration: float) -> dict:
    """Start `apr ARGS`, SIGKILL it at a seeded random moment; what the moment hit."""
    mid_write = rng.random() < 0.5
    proc = popen_apr(*args)
    started = time.monotonic()
    if mid_write:  # wait for the first temp file, then a little more
        while proc.poll() is None and not leftovers(watch) and time.monotonic() - started < 120:
            time.sleep(POLL)
        time.sleep(rng.uniform(0, 0.05))
    else:
        time.sleep(rng.uniform(0, duration))
    during_write = bool(leftovers(watch))
    proc.send_signal(signal.SIGKILL)
    code = proc.wait()
    return {"killed": code == -signal.SIGKILL, "during_write": during_write and code == -signal.SIGKILL}


def timed(*args) -> float:
    began = time.monotonic()
    proc = run_apr(*args)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - began


def assert_some_kills_mid_write(test: str, outcomes: list[dict]) -> None:
    """The test exercised what it is about: kills landed, at least one while a temp file existed."""
    killed, mid_write = sum(o["killed"] for o in outcomes), sum(o["during_write"] for o in outcomes)
    record(test, cases=len(outcomes), killed=killed, killed_mid_write=mid_write)
    assert killed > 0 and mid_write > 0, outcomes


# -- convert ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory) -> dict[str, Path]:
    """A 25 MiB HF checkpoint, an older different .apr, and reference conversions/exports."""
    root = tmp_path_factory.mktemp("crash")
    src = write_hf_folder(root / "hf", BIG_CONFIG)
    old_src = write_hf_folder(root / "hf-old", BIG_CONFIG, seed=1)
    assert run_apr("convert", old_src, "-o", root / "old.apr", "-q").returncode == 0
    assert run_apr("convert", src, "-o", root / "new.apr", "-q").returncode == 0
    assert run_apr("export", root / "old.apr", "-o", root / "old-hf", "-q").returncode == 0
    assert run_apr("export", root / "new.apr", "-o", root / "new-hf", "-q").returncode == 0
    return {"root": root, "src": src, "old": root / "old.apr", "new": root / "new.apr",
            "old_hf": root / "old-hf", "new_hf": root / "new-hf"}


def apr_identity(path: Path) -> tuple:
    """What makes a converted file "the same": tensor bytes and metadata apart from its creation time."""
    with open_apr(path) as f:
        meta = {k: v for k, v in f.metadata.items() if k != "created_at"}
        return json.dumps(meta, sort_keys=True), tuple((n, hashlib.sha256(f.raw(n)).hexdigest()) for n in f.keys())


def test_kill_during_convert_never_leaves_a_torn_file(big, tmp_path):
    rng = random.Random(6)
    duration = timed("convert", big["src"], "-o", tmp_path / "calibrate.apr", "-q")
    old_sha, new_id = sha(big["old"]), apr_identity(big["new"])
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "model.apr"
    outcomes = []
    for case in range(CASES):
        had_old = case % 2 == 0  # half the cases replace an existing file with --force
        if had_old:
            shutil.copyfile(big["old"], dest)
        elif dest.exists():
            dest.unlink()
        outcomes.append(kill_at_random(["convert", big["src"], "-o", dest, "--force", "-q"], out, rng, duration))
        visible = sorted(p.name for p in out.iterdir() if not TEMP_NAME.match(p.name))
        assert visible in ([], ["model.apr"]), visible
        if not dest.exists():
            assert not had_old, f"case {case}: the old file vanished"
            continue
        if had_old and sha(dest) == old_sha:
            continue
        assert validate_file(dest).ok, f"case {case}: torn file {validate_file(dest).to_dict()}"
        assert apr_identity(dest) == new_id, f"case {case}: a valid file that is neither old nor new"
    assert_some_kills_mid_write("convert", outcomes)
    assert run_apr("convert", big["src"], "-o", dest, "--force", "-q").returncode == 0
    assert leftovers(out) == []  # the stale temp files of killed runs are gone
    assert apr_identity(dest) == new_id


# -- export ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["folder", "safetensors"])
def test_kill_during_export_never_leaves_a_torn_output(kind, big, tmp_path):
    rng = random.Random(7 if kind == "folder" else 8)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / ("hf" if kind == "folder" else "model.safetensors")
    duration = timed("export", big["new"], "-o", tmp_path / f"calibrate-{dest.name}", "-q")
    old, new = ({"model.safetensors": sha(big[f"{which}_hf"] / "model.safetensors")} if kind == "safetensors"
                else tree(big[f"{which}_hf"]) for which in ("old", "new"))
    # An old folder is swapped out in one step where the kernel can exchange names; elsewhere it is
    # briefly absent between two renames.
    may_vanish = kind == "folder" and not _can_exchange(tmp_path)
    outcomes = []
    for case in range(CASES):
        had_old = case % 2 == 0
        _reset_export(dest, big["old_hf"] if had_old else None)
        outcomes.append(kill_at_random(["export", big["new"], "-o", dest, "--force", "-q"], out, rng, duration))
        found = _export_state(dest)
        assert found in ([old, new] if had_old else [new]) or (found is None and (not had_old or may_vanish)), \
            f"case {case}: {found}"
        assert all(TEMP_NAME.match(name) for name in os.listdir(out) if name != dest.name), os.listdir(out)
    assert_some_kills_mid_write(f"export {kind}", outcomes)
    assert run_apr("export", big["new"], "-o", dest, "--force", "-q").returncode == 0
    assert _export_state(dest) == new
    assert leftovers(out) == []  # the temps of killed runs are gone


def _can_exchange(folder: Path) -> bool:
    a, b = folder / "exchange-a", folder / "exchange-b"
    a.mkdir()
    b.mkdir()
    try:
        return exchange(str(a), str(b))
    finally:
        a.rmdir()
        b.rmdir()


def _reset_export(dest: Path, old_hf: Path | None) -> None:
    if dest.is_dir():
        shutil.rmtree(dest)
    elif dest.exists():
        dest.unlink()
    if old_hf is not None:
        if dest.suffix == ".safetensors":
            shutil.copyfile(old_hf / "model.safetensors", dest)
        else:
            shutil.copytree(old_hf, dest)


def _export_state(dest: Path) -> dict[str, str] | None:
    if not dest.exists():
        return None
    return tree(dest) if dest.is_dir() else {"model.safetensors": sha(dest)}


# -- training checkpoints --------------------------------------------------------------------
STEPS = 12
TRAIN = ["--arch", "tiny", "--steps", str(STEPS), "--save-every", "1", "--val-every", "4", "--seq-len", "32",
         "--batch-size", "4", "--val-batches", "2", "--warmup", "2", "--lr", "3e-3", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.bin"
    write_token_file(path, [np.random.default_rng(0).integers(0, 512, 20_000)], 512)
    return path


def check_run_folder(run: Path) -> int:
    """Every checkpoint file present is whole; returns the newest complete checkpoint's step (0: none)."""
    newest = 0
    for apr in sorted((run / "checkpoints").glob("step-*.apr")):
        assert validate_file(apr).ok, f"torn checkpoint {apr.name}"
        state = apr.with_name(apr.name[: -len(".apr")] + ".state.json")
        if state.exists():
            scalars = json.loads(state.read_text())
            from safetensors.numpy import load_file

            load_file(state.with_name(scalars["tensors_file"]))  # whole, or the JSON would not exist
            newest = max(newest, scalars["step"])
    for name in os.listdir(run / "checkpoints"):
        assert name.endswith((".apr", ".state.json", ".state.safetensors")) or TEMP_NAME.match(name), name
    if (run / "final.apr").exists():
        assert validate_file(run / "final.apr").ok
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    return newest


def _writing(run: Path) -> bool:
    try:
        return any(TEMP_NAME.match(name) for name in os.listdir(run / "checkpoints"))
    except FileNotFoundError:
        return False


def _wait_for_training(proc: subprocess.Popen, run: Path) -> float:
    """When the run folder's run.json appears: imports and loading are over, the first step starts."""
    while not (run / "run.json").exists() and proc.poll() is None:
        time.sleep(POLL)
    return time.monotonic()


def test_kill_during_training_checkpoints_then_resume_reproduces_the_run(tokens, tmp_path):
    """Checkpoints every step; kill at a random moment of training, check every file, --resume to the end:
    the final weights and every logged loss equal the uninterrupted run's."""
    baseline = tmp_path / "baseline"
    proc = popen_apr("pretrain", "--data", tokens, "--out", baseline, *TRAIN)
    training = _wait_for_training(proc, baseline)
    assert proc.wait() == 0
    duration = time.monotonic() - training  # from the first step to the end
    expected = read_metrics(baseline)
    rng = random.Random(9)
    outcomes = []
    for case in range(TRAIN_CASES):
        run = tmp_path / f"run{case}"
        args = ["pretrain", "--data", tokens, "--out", run, *TRAIN]
        proc = popen_apr(*args)
        started = _wait_for_training(proc, run)
        if rng.random() < 0.5:  # the moment a checkpoint file is being written (or just after)
            while proc.poll() is None and not _writing(run) and time.monotonic() - started < 60:
                time.sleep(POLL)
            time.sleep(rng.uniform(0, 0.002))
        else:  # anywhere in training (0.6: inside it even when this run is faster than the baseline)
            time.sleep(rng.uniform(0, 0.6 * duration))
        during_write = bool(leftovers(run))
        proc.send_signal(signal.SIGKILL)
        outcomes.append({"killed": proc.wait() == -signal.SIGKILL, "during_write": during_write})
        newest = check_run_folder(run)
        resumed = run_apr("pretrain", "--resume", run, "-q")
        if newest == 0:
            assert resumed.returncode == 2 and "no complete checkpoint" in resumed.stderr, resumed.stderr
            continue
        assert resumed.returncode == 0, resumed.stderr
        assert check_run_folder(run) == STEPS
        got = read_metrics(run)
        assert [r["step"] for r in got] == [r["step"] for r in expected]
        for a, b in zip(expected, got):
            for key in ("loss", "val_loss", "lr", "grad_norm"):
                assert (a.get(key) is None) == (b.get(key) is None) and (
                    a.get(key) is None or abs(a[key] - b[key]) <= 1e-6), (case, a["step"], key, a.get(key), b.get(key))
        with open_apr(baseline / "final.apr") as f, open_apr(run / "final.apr") as g:
            assert all(np.array_equal(f[n], g[n]) for n in f.keys())
        assert leftovers(run) == []  # every file the kill interrupted was rewritten, so its temp is gone
    killed = sum(o["killed"] for o in outcomes)
    record("pretrain", cases=len(outcomes), killed=killed, killed_mid_write=sum(o["during_write"] for o in outcomes))
    assert killed > 0, outcomes
