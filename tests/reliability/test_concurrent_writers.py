"""Two processes writing one destination: without --force exactly one succeeds and the other fails with a
one-line "exists" error (naming the writer's PID while it still writes); with --force the last complete
write wins. Never a FileNotFoundError, never a torn file, never a temp left behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr, save_apr
from apr_format.atomic import link_into_place

from apr_testing import FIXTURES, finish, leftovers, one_line_error, popen_apr, run_apr

# Pause the CLI once it holds its claim on the output (a locked temp, or the run folder), until GO appears.
HOLD = """
import importlib, os, time
HERE, GO = {here!r}, {go!r}
def _pausing(original):
    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        open(HERE, "w").close()
        for _ in range(6000):
            if os.path.exists(GO):
                break
            time.sleep(0.01)
        return result
    return paused
_module = importlib.import_module({module!r})
setattr(_module, {attr!r}, _pausing(getattr(_module, {attr!r})))
"""


def command(kind: str, dest: Path, *more: str) -> list:
    source = {"convert": FIXTURES / "tiny-qwen2-hf", "export": dest.parent.parent / "model.apr"}[kind]
    return [kind, source, "-o", dest, "-q", *more]


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.apr"
    assert run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", path, "-q").returncode == 0
    return path


def complete(dest: Path) -> None:
    """`dest` is a whole output: an .apr whose CRC matches, or a safetensors file / HF folder export reads."""
    if dest.suffix == ".apr":
        with open_apr(dest) as apr:
            apr.verify()
    else:
        assert run_apr("diff", dest.parent.parent / "model.apr", dest).returncode in (0, 1)


def hold_then_race(tmp_path: Path, hook: str, first: list, second: list):
    """Start `first`, pausing it right after `hook` (module.function) took its claim; run `second` to the
    end; then let `first` finish."""
    here, go = tmp_path / "here", tmp_path / "go"
    module, attr = hook.rsplit(".", 1)
    holder = popen_apr(*first, capture=True, prelude=HOLD.format(here=str(here), go=str(go), module=module, attr=attr))
    for _ in range(6000):
        if here.exists() or holder.poll() is not None:
            break
        time.sleep(0.01)
    assert here.exists(), finish(holder).stderr
    other = run_apr(*second)
    go.touch()
    return finish(holder), other, holder.pid


@pytest.mark.parametrize("kind,name", [("convert", "m.apr"), ("export", "m.safetensors"), ("export", "hf"), ("export", "m.gguf")])
def test_second_writer_names_the_first(kind, name, model, tmp_path):
    dest = tmp_path / "out" / name
    dest.parent.mkdir()
    hook = "apr_format.tempfiles." + ("create_temp_dir" if name == "hf" else "create_temp")
    held = tmp_path / "held"
    held.mkdir()
    first, second, pid = hold_then_race(held, hook, command(kind, dest), command(kind, dest))
    assert first.returncode == 0, first.stderr
    line = one_line_error(second)
    assert second.returncode == 2 and "exists" in line and f"PID {pid}" in line and str(dest) in line, line
    complete(dest)
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("kind,name", [("convert", "m.apr"), ("export", "m.safetensors"), ("export", "hf"), ("export", "m.gguf")])
def test_two_writers_started_together(kind, name, model, tmp_path):
    dest = tmp_path / "out" / name
    dest.parent.mkdir()
    procs = [popen_apr(*command(kind, dest), capture=True) for _ in range(2)]
    results = sorted((finish(p) for p in procs), key=lambda r: r.returncode)
    assert [r.returncode for r in results] == [0, 2], [r.stderr for r in results]
    line = one_line_error(results[1])
    assert "exists" in line and str(dest) in line, line
    complete(dest)
    assert leftovers(dest.parent) == []


@pytest.mark.parametrize("kind,name", [("convert", "m.apr"), ("export", "hf")])
def test_forced_writers_last_complete_wins(kind, name, model, tmp_path):
    dest = tmp_path / "out" / name
    dest.parent.mkdir()
    procs = [popen_apr(*command(kind, dest, "--force"), capture=True) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    complete(dest)
    assert leftovers(dest.parent) == []


PRETRAIN = ["--data", FIXTURES / "tiny-corpus.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "16",
            "--device", "cpu", "-q"]


def test_two_runs_into_one_folder(model, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--init", model, "--out", run, *PRETRAIN]
    first, second, pid = hold_then_race(tmp_path, "apr_trainer.runlog.claim_folder", args, args)
    assert first.returncode == 0, first.stderr
    line = one_line_error(second)
    assert second.returncode == 2 and f"PID {pid}" in line and str(run) in line, line
    complete(run / "final.apr")
    assert leftovers(run) == []
    again = run_apr(*args)  # the first run is over: the folder now holds a run
    assert again.returncode == 2 and "already holds a run" in one_line_error(again)


def test_final_link_races_never_lose_the_file(tmp_path):
    """Two writers publishing one final.apr by hard link: each one's cleanup of dead temps must not take
    the other's linked temp (it used to, and the loser's rename failed with FileNotFoundError)."""
    sources = []
    for i in range(2):
        sources.append(tmp_path / f"ckpt-{i}.apr")
        save_apr(sources[-1], {"w": np.full(4, i, np.float32)})
    dest, errors = tmp_path / "final.apr", []

    def publish(src: Path) -> None:
        try:
            for _ in range(300):
                link_into_place(src, dest)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert os.path.samefile(dest, sources[0]) or os.path.samefile(dest, sources[1])
    assert leftovers(tmp_path) == []
    for _ in range(2):  # publishing the file final.apr already links: rename(2) is then a no-op
        link_into_place(sources[0], dest)
    assert os.path.samefile(dest, sources[0]) and leftovers(tmp_path) == []


def test_a_run_that_finished_meanwhile_is_not_cleared(model, tmp_path):
    """B checks the empty folder, then waits; A runs to the end there; B must then refuse (checked again
    under the folder's claim), not clear A's finished run."""
    run = tmp_path / "run"
    args = ["pretrain", "--init", model, "--out", run, *PRETRAIN]
    late, first, _ = hold_then_race(tmp_path, "apr_trainer.train.check_run_dir", args, args)
    assert first.returncode == 0, first.stderr
    line = one_line_error(late)
    assert late.returncode == 2 and "already holds a run" in line and str(run) in line, line
    complete(run / "final.apr")


def test_two_tokenize_runs_into_one_new_folder(tmp_path):
    """The second `apr tokenize` into a folder the first one is filling fails naming it; the first completes."""
    out = tmp_path / "tokens"
    args = ["tokenize", FIXTURES / "tiny-corpus.txt", "-o", out, "--tokenizer", FIXTURES / "tiny-qwen2-hf" /
            "tokenizer.json", "-q"]
    first, second, pid = hold_then_race(tmp_path, "apr_trainer.pretokenize.claim_folder", args, args)
    assert first.returncode == 0, first.stderr
    line = one_line_error(second)
    assert second.returncode == 2 and f"PID {pid}" in line and str(out) in line, line
    assert (out / "index.json").is_file()
