"""Sources cut short by another program while `apr` reads them: a one-line error naming the file and
exit 2 (validate: its FAIL report, exit 1), never a death by SIGBUS; no temp left once the next write runs.

The cut is real: a `truncate` process shortens the real file at a chosen moment of the read (the first
read of tensor data past the half of the file, or the first read after the header), found by wrapping
the one pread helper every read path goes through.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from apr_format import open_apr
from apr_format.errors import Truncated
from apr_format.init_tensors import load_init_tensors
from apr_converters.apr_to_hf import export_apr_to_safetensors
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_trainer.data import write_token_file

from apr_testing import FIXTURES, leftovers, one_line_error, run_apr

# Truncate TARGET (to half its size, or to 100 bytes) just before the first pread of it that `WHEN` picks.
CUT = """
import os, subprocess, sys
from apr_format import fileio, reader, sourceio
TARGET, WHEN = {target!r}, {when!r}
_read_into, _done = sourceio.read_into, []
def read_into(fd, offset, buf, path):
    size = os.fstat(fd).st_size
    tail = offset + len(buf) > size // 2 if WHEN == "data" else offset > 0
    if not _done and os.path.samefile(path, TARGET) and tail:
        _done.append(1)
        subprocess.run(["truncate", "-s", str(size // 2 if WHEN == "data" else 100), path], check=True)
    return _read_into(fd, offset, buf, path)
sourceio.read_into = reader.read_into = fileio.read_into = read_into
"""


@pytest.fixture
def model(tmp_path) -> Path:
    """A fresh copy of the tiny model as .apr (each test cuts its own)."""
    path = tmp_path / "src" / "model.apr"
    path.parent.mkdir()
    assert run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", path, "-q").returncode == 0
    return path


def cut_run(target: Path, when: str, *args) -> object:
    return run_apr(*args, prelude=CUT.format(target=str(target), when=when))


def check_error(proc, target: Path) -> None:
    line = one_line_error(proc)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)  # never negative: no signal death
    assert str(target) in line and ("cut short" in line or "shrank" in line or "ended" in line), line


def test_convert_source_cut(tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(FIXTURES / "tiny-qwen2-hf", src)
    dest = tmp_path / "out" / "m.apr"
    dest.parent.mkdir()
    proc = cut_run(src / "model.safetensors", "data", "convert", src, "-o", dest, "-q")
    check_error(proc, src / "model.safetensors")
    assert not dest.exists() and leftovers(dest.parent) == []
    shutil.copyfile(FIXTURES / "tiny-qwen2-hf" / "model.safetensors", src / "model.safetensors")
    assert run_apr("convert", src, "-o", dest, "-q").returncode == 0 and leftovers(dest.parent) == []


@pytest.mark.parametrize("output", ["hf", "m.safetensors", "m.gguf"])
def test_export_source_cut(model, output, tmp_path):
    dest = tmp_path / "out" / output
    dest.parent.mkdir()
    check_error(cut_run(model, "data", "export", model, "-o", dest, "-q"), model)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_reencoding_convert_of_an_apr_source_cut(model, tmp_path):
    dest = tmp_path / "out" / "f32.apr"
    dest.parent.mkdir()
    check_error(cut_run(model, "data", "convert", model, "-o", dest, "--dtype", "f32", "-q"), model)
    assert not dest.exists() and leftovers(dest.parent) == []


def test_eval_source_cut(model):
    check_error(cut_run(model, "data", "eval", model, "--data", FIXTURES / "tiny-corpus.txt", "--seq-len", "16",
                        "--max-tokens", "64"), model)


def test_diff_source_cut(model, tmp_path):
    other = tmp_path / "other.apr"
    assert run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", other, "--dtype", "f32", "-q").returncode == 0
    check_error(cut_run(model, "data", "diff", other, model), model)


def test_tensors_source_cut(model):
    check_error(cut_run(model, "index", "tensors", model), model)


def test_inspect_source_cut(model):
    check_error(cut_run(model, "index", "inspect", model), model)


def test_validate_source_cut_is_a_fail_report(model):
    proc = cut_run(model, "index", "validate", model)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "FAIL" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_pretrain_init_source_cut(model, tmp_path):
    run = tmp_path / "run"
    proc = cut_run(model, "data", "pretrain", "--init", model, "--data", FIXTURES / "tiny-corpus.txt", "--out", run,
                   "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "-q")
    check_error(proc, model)
    assert not (run / "final.apr").exists()


def test_pretrain_data_cut(tmp_path):
    tokens = tmp_path / "tokens.bin"
    write_token_file(tokens, [np.random.default_rng(0).integers(0, 512, 20_000)], 512)
    proc = cut_run(tokens, "data", "pretrain", "--arch", "tiny", "--data", tokens, "--out", tmp_path / "run",
                   "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "-q")
    check_error(proc, tokens)


def test_load_init_tensors_in_process(model):
    """The library loader: a file cut short after opening is `Truncated`, and loaded tensors own their bytes."""
    loaded = load_init_tensors(model)
    before = loaded["model.norm.weight"].clone()
    size = model.stat().st_size
    with open(model, "r+b") as fh:
        fh.truncate(size // 2)
    assert (loaded["model.norm.weight"] == before).all()  # reading them now cannot fault
    with pytest.raises(Truncated, match="model.apr"):
        load_init_tensors(model)


def test_mapped_access_after_a_cut_is_refused(model):
    """Where a caller asks for zero-copy views, the size is checked before each access."""
    with open_apr(model, use_mmap=True) as apr:
        assert apr.mapped
        name = apr.keys()[-1]
        with open(model, "r+b") as fh:
            fh.truncate(apr.header.data_offset)
        with pytest.raises(Truncated, match="shrank"):
            apr[name]


def _replace_once(path: Path, replacement: Path):
    """A progress callback that, at its first call, replaces `path` by `replacement` (as an atomic writer does)."""
    def progress(name: str, done: int, total: int | None = None) -> None:
        if replacement.exists():
            os.replace(replacement, path)

    return progress


def test_convert_reads_the_files_it_opened_when_a_shard_is_replaced_meanwhile(tmp_path):
    """The kernel-side copies of a convert go through the descriptor opened when the headers were read:
    a shard replaced by another file mid-convert changes nothing in the output."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "hf"
    shutil.copytree(FIXTURES / "tiny-qwen2-hf", src)
    reference = convert_hf_to_apr(src, tmp_path / "reference.apr").output
    other = tmp_path / "other.safetensors"
    save_file({name: value + 1 for name, value in load_file(src / "model.safetensors").items()}, other)
    convert_hf_to_apr(src, tmp_path / "m.apr", progress=_replace_once(src / "model.safetensors", other))
    assert not other.exists()  # the replacement happened, after the first tensor
    with open_apr(reference) as a, open_apr(tmp_path / "m.apr") as b:
        b.verify()
        assert a.keys() == b.keys() and all(np.array_equal(a.bits(n), b.bits(n)) for n in a.keys())


def test_export_reads_the_file_it_opened_when_its_path_is_replaced_meanwhile(model, tmp_path):
    """Tensor reads and the CRC check both go through the file `open_apr` parsed."""
    reference = tmp_path / "reference.safetensors"
    export_apr_to_safetensors(model, reference)
    other = tmp_path / "other.apr"
    assert run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", other, "--dtype", "f32", "-q").returncode == 0
    export_apr_to_safetensors(model, tmp_path / "m.safetensors", progress=_replace_once(model, other))
    assert not other.exists()
    assert (tmp_path / "m.safetensors").read_bytes() == reference.read_bytes()
