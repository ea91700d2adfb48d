"""Full disks and failing reads while `apr` writes: one line naming the file, exit 2, and nothing left behind
(no output, or the old output untouched; no temp file).

Two ways to fill the disk: RLIMIT_FSIZE in the child (writes past the cap fail with EFBIG; SIGXFSZ is
ignored so the error reaches Python), and a real tmpfs too small for the output (ENOSPC) where this
machine lets us mount one; without that permission the second way falls back to the first. Writing to
/dev/full gives a real ENOSPC on stdout everywhere. Read errors are injected where converters read tensor
bytes (kernel copies and mapped streams).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from apr_format import save_apr
from apr_trainer.data import write_token_file

from apr_testing import APR_COMMAND, FIXTURES, apr_env, leftovers, one_line_error, run_apr


FULL = ("File too large", "No space left on device")


@contextmanager
def small_disk(folder: Path, size_kb: int):
    """`folder` on a tmpfs of `size_kb` KiB: yields (folder, None); without mount rights (folder, cap)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                             capture_output=True, check=False).returncode == 0
    try:
        yield folder, (None if mounted else size_kb * 1024)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], check=True)


@contextmanager
def capped(folder: Path, size_kb: int):
    """`folder` with writes capped at `size_kb` KiB per file (RLIMIT_FSIZE): yields (folder, cap)."""
    folder.mkdir()
    yield folder, size_kb * 1024


WAYS = {"rlimit": capped, "small-fs": small_disk}


def digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(path.iterdir()))).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    model = root / "model.apr"
    assert run_apr("convert", FIXTURES / "tiny-qwen2-hf", "-o", model, "-q").returncode == 0
    save_apr(root / "old.apr", {"old": np.zeros(4, np.float32)})
    (root / "old-hf").mkdir()
    (root / "old-hf" / "config.json").write_text("{}\n")
    write_token_file(root / "tokens.bin", [np.random.default_rng(0).integers(0, 512, 20_000)], 512)
    write_token_file(root / "old-tokens.bin", [np.arange(100)], 512)
    (root / "old.txt").write_text("An old, short corpus.\n")
    (root / "corpus.txt").write_text((FIXTURES / "tiny-corpus.txt").read_text() * 5)  # tokens over 64 KiB
    assert run_apr("tokenize", root / "old.txt", "-o", root / "old-run", "--tokenizer",
                   FIXTURES / "tiny-qwen2-hf" / "tokenizer.json", "-q").returncode == 0
    return {"root": root, "model": model, "old": root / "old.apr", "old_hf": root / "old-hf",
            "tokens": root / "tokens.bin", "old_tokens": root / "old-tokens.bin", "old_run": root / "old-run",
            "corpus": root / "corpus.txt"}


def check_failed_write(proc, dest: Path, old: str | None, folder: Path) -> None:
    """Exit 2 with one line naming `dest` and the full disk; `dest` absent or unchanged; no temp file."""
    line = one_line_error(proc)
    assert proc.returncode == 2 and str(dest) in line and line.endswith(FULL), line
    assert (digest(dest) if dest.exists() else None) == old
    assert leftovers(folder) == [], leftovers(folder)


# Command, the output it writes, what an existing old output is, disk size in KiB.
WRITES = {
    "convert": (lambda i, d: ["convert", FIXTURES / "tiny-qwen2-hf", "-o", d, "--force", "-q"], "m.apr", "old", 64),
    "export folder": (lambda i, d: ["export", i["model"], "-o", d, "--force", "-q"], "hf", "old_hf", 64),
    "export file": (lambda i, d: ["export", i["model"], "-o", d, "--force", "-q"], "m.safetensors", "old", 64),
    "tokenize": (lambda i, d: ["tokenize", i["corpus"], "-o", d, "--force", "--tokenizer",
                               FIXTURES / "tiny-qwen2-hf" / "tokenizer.json", "-q"], "t", "old_run", 64),
}


@pytest.mark.parametrize("way", sorted(WAYS))
@pytest.mark.parametrize("with_old", [False, True], ids=["new", "replacing"])
@pytest.mark.parametrize("command", sorted(WRITES))
def test_full_disk_while_writing(command, with_old, way, inputs, tmp_path):
    args, name, old_key, size_kb = WRITES[command]
    if with_old and old_key is None:
        old_key = "old_tokens"
    with WAYS[way](tmp_path / "disk", size_kb) as (folder, cap):
        dest = folder / name
        if with_old:
            (shutil.copytree if inputs[old_key].is_dir() else shutil.copyfile)(inputs[old_key], dest)
        old = digest(dest) if with_old else None
        proc = run_apr(*args(inputs, dest), fsize=cap)
        check_failed_write(proc, dest, old, folder)


def test_export_to_a_full_stdout(inputs):
    """`apr export -o -` into /dev/full: a real ENOSPC on every machine."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([*APR_COMMAND, "export", str(inputs["model"]), "-o", "-"], stdout=full,
                              stderr=subprocess.PIPE, text=True, env=apr_env(), check=False)
    line = one_line_error(proc)
    assert proc.returncode == 2 and "No space left on device" in line, line


TRAIN = ["--arch", "tiny", "--steps", "4", "--save-every", "2", "--seq-len", "32", "--batch-size", "4",
         "--val-batches", "2", "--device", "cpu", "-q"]


@pytest.mark.parametrize("cap_kb,fails", [(200, "step-000002.apr"), (700, "step-000002.state.safetensors")])
def test_full_disk_while_saving_a_checkpoint(cap_kb, fails, inputs, tmp_path):
    """The weights (560 KiB) or the optimizer state (850 KiB) do not fit: exit 2, no checkpoint counts as complete,
    no temp file; --resume then says there is nothing to resume instead of loading half a checkpoint."""
    run = tmp_path / "run"
    proc = run_apr("pretrain", "--data", inputs["tokens"], "--out", run, *TRAIN, fsize=cap_kb * 1024)
    line = one_line_error(proc)
    assert proc.returncode == 2 and fails in line and line.endswith(FULL), line
    assert leftovers(run) == []
    assert not list((run / "checkpoints").glob("*.state.json"))
    resumed = run_apr("pretrain", "--resume", run)
    assert resumed.returncode == 2 and "no complete checkpoint" in one_line_error(resumed)


# -- read errors -----------------------------------------------------------------------------
FAIL_FIFTH_READ = """
import errno, os
from apr_converters import source_files
from apr_format import safetensors_writer, writer
_calls = []
def _fault(path, start):  # every way a converter reads tensor bytes passes here
    _calls.append(path)
    if len(_calls) == 5:
        {fault}
def _wrap(original):
    def copy_range(src, *args, **kwargs):
        _fault(src.path, src.offset)
        return original(src, *args, **kwargs)
    return copy_range
writer.copy_range = _wrap(writer.copy_range)
safetensors_writer.copy_range = _wrap(safetensors_writer.copy_range)
_read = source_files.SourceFiles.read
def read(self, file, start, nbytes):
    _fault(file, start)
    return _read(self, file, start, nbytes)
source_files.SourceFiles.read = read
"""
EIO = FAIL_FIFTH_READ.format(fault='raise OSError(errno.EIO, "Input/output error", path)')
TRUNCATE = FAIL_FIFTH_READ.format(fault="os.truncate(path, start)  # another program cuts the file short")


@pytest.mark.parametrize("command", ["convert", "export"])
@pytest.mark.parametrize("with_old", [False, True], ids=["new", "replacing"])
def test_read_error_mid_write_leaves_nothing(command, with_old, inputs, tmp_path):
    dest = tmp_path / ("m.apr" if command == "convert" else "m.safetensors")
    src = FIXTURES / "tiny-qwen2-hf" if command == "convert" else inputs["model"]
    if with_old:
        shutil.copyfile(inputs["old"], dest)
    old = digest(dest) if with_old else None
    proc = run_apr(command, src, "-o", dest, "--force", "-q", prelude=EIO)
    line = one_line_error(proc)
    assert proc.returncode == 2 and line.endswith("Input/output error") and str(src) in line, line
    assert (digest(dest) if dest.exists() else None) == old
    assert leftovers(tmp_path) == []


def test_source_truncated_mid_convert(inputs, tmp_path):
    """Another program truncates the source while it is read: a clean `Truncated` error naming the file
    (every read is a pread, never a mapped access that would die by SIGBUS); the destination keeps its
    old content and the next conversion to it removes any temp file."""
    src = tmp_path / "hf"
    shutil.copytree(FIXTURES / "tiny-qwen2-hf", src)
    dest = tmp_path / "out" / "m.apr"
    dest.parent.mkdir()
    shutil.copyfile(inputs["old"], dest)
    old = digest(dest)
    proc = run_apr("convert", src, "-o", dest, "--force", "-q", prelude=TRUNCATE)
    line = one_line_error(proc)
    assert proc.returncode == 2 and str(src / "model.safetensors") in line, line
    assert digest(dest) == old and leftovers(dest.parent) == []
    shutil.rmtree(src)
    shutil.copytree(FIXTURES / "tiny-qwen2-hf", src)
    assert run_apr("convert", src, "-o", dest, "--force", "-q").returncode == 0
    assert leftovers(dest.parent) == [] and digest(dest) != old
