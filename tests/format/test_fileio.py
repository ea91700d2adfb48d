"""fileio: CRC, kernel copies of file ranges (as AprWriter sources), and validate's single read pass."""

from __future__ import annotations

import errno
import os
import zlib

import numpy as np
import pytest

from apr_format import AprWriter, errors, fileio, open_apr, save_apr, validate
from apr_format.fileio import FileRange, Writeback, copy_range, crc32
from apr_format.sourceio import on_network_fs, parse_mountinfo
from apr_format.validate import validate_file


@pytest.fixture
def blob(tmp_path):
    """A file of 10,000 random bytes and those bytes."""
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    return str(path), data


def test_crc32_is_zlibs(blob):
    _, data = blob
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[5000:], crc32(data[:5000])) == zlib.crc32(data)


@pytest.mark.parametrize("chunk", [fileio.CHUNK, 4096, 1000])
@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range_copies_and_crcs_any_range(blob, tmp_path, monkeypatch, chunk, kernel):
    path, data = blob
    monkeypatch.setattr(fileio, "CHUNK", chunk)
    if not kernel:  # copy_file_range refusing the pair of files: plain writes instead
        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    out = tmp_path / "out.bin"
    with open(out, "wb") as fh:
        fh.write(b"head")
        fh.flush()
        crc = copy_range(FileRange(path, 4097, 5000), fh.fileno(), crc32(b"head"), Writeback(fh.fileno()))
        assert copy_range(FileRange(path, 3, 7), fh.fileno()) is None  # no CRC asked for
    assert out.read_bytes() == b"head" + data[4097:9097] + data[3:10]
    assert crc == zlib.crc32(b"head" + data[4097:9097])


def test_copy_range_past_the_end_is_truncated(blob, tmp_path):
    path, _ = blob
    with open(tmp_path / "out.bin", "wb") as fh, pytest.raises(errors.Truncated, match="beyond the end"):
        copy_range(FileRange(path, 9000, 1001), fh.fileno(), 0)


def test_file_range_rejects_negative_numbers(blob):
    with pytest.raises(errors.InvalidArgument):
        FileRange(blob[0], -1, 4)


def test_writer_file_ranges_give_the_same_file_as_arrays(blob, tmp_path):
    path, data = blob
    arrays = {"a": np.frombuffer(data[:4000], np.float32).reshape(10, 100), "b": np.frombuffer(data[4000:4100], np.uint8)}
    save_apr(tmp_path / "arrays.apr", arrays, {"k": 1})
    with AprWriter(tmp_path / "ranges.apr", {"k": 1}) as w:
        w.add("a", FileRange(path, 0, 4000), dtype="f32", shape=(10, 100))
        w.add("b", lambda: FileRange(path, 4000, 100), dtype="u8", shape=(100,))  # lazy, as converters pass them
    assert (tmp_path / "ranges.apr").read_bytes() == (tmp_path / "arrays.apr").read_bytes()
    with open_apr(tmp_path / "ranges.apr") as f:
        f.verify()


def test_writer_file_range_with_zstd(blob, tmp_path):
    path, data = blob
    with AprWriter(tmp_path / "z.apr", compression="zstd") as w:
        w.add("a", FileRange(path, 0, 4000), dtype="f32", shape=(1000,))
    with open_apr(tmp_path / "z.apr") as f:
        f.verify()
        assert bytes(f.raw("a")) == data[:4000]


def test_writer_refuses_a_range_of_the_wrong_size(blob, tmp_path):
    path, _ = blob
    w = AprWriter(tmp_path / "bad.apr")
    with pytest.raises(errors.InvalidArgument, match="do not hold"):
        w.add("a", FileRange(path, 0, 4000), dtype="f32", shape=(999,))
    w.add("b", lambda: FileRange(path, 0, 40), dtype="f32", shape=(11,))
    with pytest.raises(errors.InvalidArgument, match="holds 40 bytes, planned 44"):
        w.close()
    assert not (tmp_path / "bad.apr").exists()


def test_writer_range_beyond_the_source_leaves_no_file(blob, tmp_path):
    path, _ = blob
    with pytest.raises(errors.Truncated, match="blob.bin"):
        with AprWriter(tmp_path / "t.apr") as w:
            w.add("a", FileRange(path, 8000, 4000), dtype="u8", shape=(4000,))
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_validate_counts_nan_and_inf_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "CHUNK", 256)  # many chunks per tensor, tensors straddling chunk ends
    f32 = np.zeros(1000, np.float32)
    f32[[0, 63, 64, 999]] = [np.nan, np.inf, -np.inf, np.nan]
    bf16 = np.zeros(777, np.uint16)
    bf16[[1, 128, 776]] = [0x7FC0, 0xFF80, 0x7F81]  # NaN, -Inf, NaN (bit patterns)
    with AprWriter(tmp_path / "m.apr") as w:
        w.add("a", f32)
        w.add("b", bf16, dtype="bf16", shape=(777,))
        w.add("c", np.ones(5, np.float64))
    report = validate_file(tmp_path / "m.apr")
    counts = {t.name: (t.nan, t.inf) for t in report.nonfinite}
    assert counts == {"a": (2, 2), "b": (2, 1)}
    assert [c.name for c in report.checks if c.status == "FAIL"] == ["nan/inf"]


def test_crc32_fd_matches_zlib_on_any_range(blob):
    path, data = blob
    with open(path, "rb") as fh:
        assert fileio.crc32_fd(fh.fileno(), 0, len(data)) == zlib.crc32(data)
        assert fileio.crc32_fd(fh.fileno(), 4097, 3000, 7) == zlib.crc32(data[4097:7097], 7)
        assert fileio.crc32_fd(fh.fileno(), 10, 0, 5) == 5


def test_verify_checks_the_opened_file_even_when_its_path_is_replaced(tmp_path):
    save_apr(tmp_path / "m.apr", {"w": np.arange(4096, dtype=np.float32)}, {})
    with open_apr(tmp_path / "m.apr") as f:
        f.verify()  # pread through the file descriptor this object opened
        damaged = bytearray((tmp_path / "m.apr").read_bytes())
        damaged[-100] ^= 0xFF
        (tmp_path / "other.apr").write_bytes(damaged)
        os.replace(tmp_path / "other.apr", tmp_path / "m.apr")
        f.verify()  # the path names another (corrupt) file now: the opened file is checked
    with open_apr(tmp_path / "m.apr") as g, pytest.raises(errors.FooterChecksum):
        g.verify()


MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
36 22 0:32 / /mnt/share rw,relatime shared:20 - nfs4 server:/export rw,vers=4.2
37 22 0:33 / /mnt/my\\040drive rw,nosuid - fuse.sshfs me@host:/home rw
38 36 254:1 / /mnt/share/local rw - xfs /dev/vdb rw
"""


@pytest.mark.parametrize("path,network", [
    ("/data/model.apr", False), ("/mnt/share/model.apr", True), ("/mnt/my drive/m.apr", True),
    ("/mnt/share/local/m.apr", False), ("/mnt/shared/m.apr", False),
])
def test_network_file_systems_are_found_by_mount_point(path, network):
    """The longest mount point containing the path decides; fuse.* counts as network."""
    assert on_network_fs(path, parse_mountinfo(MOUNTINFO)) is network


def test_no_mmap_environment_turns_mapping_off(tmp_path, monkeypatch):
    path = tmp_path / "m.apr"
    save_apr(path, {"w": np.arange(4, dtype=np.float32)})
    with open_apr(path) as apr:
        assert apr.mapped  # a local file: zero-copy views
    monkeypatch.setenv("APR_NO_MMAP", "1")
    with open_apr(path) as apr:
        assert not apr.mapped and apr["w"].tolist() == [0, 1, 2, 3]
