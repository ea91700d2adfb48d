"""A rename that publishes a file is durable only once its folder is fsynced: when that fsync fails, the
write fails (naming the folder), in the library and in the CLI."""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest

from apr_format.atomic import replacing
from apr_testing import one_line_error, run_apr
from apr_trainer.data import write_token_file

# Python run before the CLI: fsync of a folder named `checkpoints` fails with EIO, as on a failing disk.
FAIL_CHECKPOINTS_FSYNC = """
import errno, os, stat
_real_fsync = os.fsync
def _fsync(fd):
    if stat.S_ISDIR(os.fstat(fd).st_mode) and os.readlink(f"/proc/self/fd/{fd}").endswith("/checkpoints"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    _real_fsync(fd)
os.fsync = _fsync
"""


def test_failed_folder_fsync_after_the_rename_is_an_error(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="durable") as caught:
        with replacing(tmp_path / "out.bin") as out:
            out.write(b"data")
    assert caught.value.errno == errno.EIO and caught.value.filename == str(tmp_path)


def test_pretrain_stops_when_a_checkpoint_cannot_be_made_durable(tmp_path):
    write_token_file(tmp_path / "tokens.bin", [np.random.default_rng(0).integers(0, 512, 4000)], 512)
    run = tmp_path / "run"
    proc = run_apr("pretrain", "--arch", "tiny", "--data", tmp_path / "tokens.bin", "--out", run, "--steps", "2",
                   "--seq-len", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu", "-q",
                   prelude=FAIL_CHECKPOINTS_FSYNC)
    assert proc.returncode == 2
    line = one_line_error(proc)
    assert line.startswith(f"apr: error: {run / 'checkpoints'}: cannot make a rename in this folder durable"), line
    assert not (run / "final.apr").exists()
