"""The stale temp-file policy: a writer removes the temp files and folders of dead writers of the same
destination (unlocked ones matching `.{name}.{8 chars}.apr-tmp`), and never a live writer's or anything
else; folders are swapped into place in one step where the kernel can."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from apr_format import open_apr, save_apr
from apr_format.atomic import exchange, replacing_folder
from apr_format.tempfiles import create_temp, create_temp_dir, is_temp_name, remove_stale


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)  # a file or a folder
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def _hold(path: Path) -> subprocess.Popen:
    """A live process holding the flock on `path` (as a writer does while it writes)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


def test_name_pattern_is_exact():
    assert is_temp_name(".model.apr.ab_9xyz0.apr-tmp", "out/model.apr")
    for name in (".model.apr.abc.apr-tmp", ".model.apr.ABCDEFGH.apr-tmp", "model.apr.abcdefgh.apr-tmp",
                 ".model.apr.abcdefgh.tmp", ".other.apr.abcdefgh.apr-tmp", ".model.apr.x.abcdefgh.apr-tmp",
                 ".model.apr.abcdefgh.apr-tmp.bak", ".model.apr.abcdefgh.apr-old"):
        assert not is_temp_name(name, "model.apr"), name


def test_a_write_removes_dead_writers_temps_and_nothing_else(tmp_path):
    dest = tmp_path / "model.apr"
    stale = [tmp_path / ".model.apr.deadbeef.apr-tmp", tmp_path / ".model.apr.0000_000.apr-tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    live = tmp_path / ".model.apr.livelive.apr-tmp"
    live.write_bytes(b"being written")
    target = tmp_path / "precious.bin"
    target.write_bytes(b"keep me")
    kept = [tmp_path / name for name in (".model.apr.abc.apr-tmp", ".other.apr.deadbeef.apr-tmp",
                                         ".model.apr.deadbeef.tmp", "model.apr.deadbeef.apr-tmp")]
    for path in kept:
        path.write_bytes(b"not ours to remove")
    stale_dir = tmp_path / ".model.apr.dirdirdi.apr-tmp"  # a killed folder export
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"half a shard")
    live_dir = tmp_path / ".model.apr.livedir_.apr-tmp"
    live_dir.mkdir()
    (tmp_path / ".model.apr.linklink.apr-tmp").symlink_to(target)
    holders = [_hold(live), _hold(live_dir)]
    try:
        save_apr(dest, {"w": np.arange(6, dtype=np.float32)})
        assert live.exists() and live_dir.is_dir()  # their writers are alive
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait()
    assert not any(path.exists() for path in [*stale, stale_dir])
    assert all(path.exists() for path in kept)
    assert target.read_bytes() == b"keep me" and (tmp_path / ".model.apr.linklink.apr-tmp").is_symlink()
    with open_apr(dest) as f:
        assert f["w"].tolist() == [0, 1, 2, 3, 4, 5]
    assert sorted(remove_stale(dest)) == sorted([str(live), str(live_dir)])  # their writers have exited now


def test_temp_file_is_locked_until_it_is_in_place(tmp_path):
    dest = tmp_path / "m.apr"
    fd, tmp = create_temp(dest)
    try:
        assert os.path.basename(tmp).startswith(".m.apr.") and is_temp_name(os.path.basename(tmp), dest)
        assert remove_stale(dest) == [] and os.path.exists(tmp)
    finally:
        os.close(fd)
    assert remove_stale(dest) == [tmp] and not os.path.exists(tmp)


WRITER = """
import sys, time
import numpy as np
from apr_format import AprWriter
with AprWriter(sys.argv[1], {"writer": sys.argv[2]}) as w:
    def slow():
        print("writing", flush=True)
        sys.stdin.read()  # stay mid-write until the test says go
        return np.full(1000, float(sys.argv[2]), np.float32)
    w.add("w", slow, dtype="f32", shape=(1000,))
"""


def test_concurrent_writers_of_one_destination_leave_each_other_alone(tmp_path):
    """Writer A is mid-write when B writes the same file: B must not take A's temp file away."""
    dest = tmp_path / "shared.apr"
    a = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), "1"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert a.stdout.readline() == "writing\n"
    save_apr(dest, {"w": np.full(1000, 2.0, np.float32)}, {"writer": "2"})
    a.stdin.close()
    assert a.wait(timeout=60) == 0, a.stderr.read()
    with open_apr(dest) as f:  # A renamed last: its complete file won
        assert f.metadata == {"writer": "1"} and set(f["w"].tolist()) == {1.0}
        f.verify()
    assert [p.name for p in tmp_path.iterdir()] == ["shared.apr"]


def test_temp_folder_is_locked_until_it_is_in_place(tmp_path):
    dest = tmp_path / "hf"
    fd, tmp = create_temp_dir(dest)
    try:
        assert is_temp_name(os.path.basename(tmp), dest) and os.path.isdir(tmp)
        assert remove_stale(dest) == [] and os.path.isdir(tmp)
    finally:
        os.close(fd)
    assert remove_stale(dest) == [tmp] and not os.path.exists(tmp)


def test_folder_replacement_swaps_in_one_step_and_cleans_up(tmp_path):
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with replacing_folder(dest) as tmp:
        (Path(tmp) / "new.txt").write_text("new")
        assert (dest / "old.txt").exists()  # untouched while the new folder is written
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    try:
        with replacing_folder(dest) as tmp:
            (Path(tmp) / "half.txt").write_text("half")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_exchange_swaps_two_names(tmp_path):
    """renameat2(RENAME_EXCHANGE) on Linux file systems that have it (tmp folders do on CI's kernels)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.mkdir()
    if exchange(str(a), str(b)):
        assert a.is_dir() and b.read_text() == "A"
    else:  # a kernel or file system without it: nothing moved
        assert a.read_text() == "A" and b.is_dir()
