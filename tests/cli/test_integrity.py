"""One integrity rule: commands that read every tensor byte check the footer CRC while they stream; header-only
commands say they did not; `--init` refuses corrupt or non-finite weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from apr_format import StreamingVerifier, load_init_tensors, open_apr, save_apr
from apr_format.errors import FooterChecksum, NonFiniteWeights
from apr_testing import GOLDEN, run_apr, run_apr_json

SOURCE = GOLDEN / "tiny-qwen2.apr"


def _flip_weight_byte(src: Path, dst: Path) -> Path:
    """A copy of `src` with one byte inside a weight changed (the exponent of one value)."""
    shutil.copyfile(src, dst)
    with open_apr(src) as f:
        info = f.info("model.norm.weight")
        at = f.header.data_offset + info.offset + 3
    data = bytearray(dst.read_bytes())
    data[at] ^= 0x7F
    dst.write_bytes(bytes(data))
    return dst


def _append_garbage(src: Path, dst: Path, n: int = 1000) -> Path:
    dst.write_bytes(src.read_bytes() + bytes(range(256)) * (n // 256) + b"\x01" * (n % 256))
    return dst


@pytest.fixture(params=["flipped", "appended"])
def corrupt(request, tmp_path) -> Path:
    make = _flip_weight_byte if request.param == "flipped" else _append_garbage
    return make(SOURCE, tmp_path / f"{request.param}.apr")


def _refused(proc, path) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"apr: error: {path}: footer CRC-32 mismatch"), proc.stderr
    assert "--no-verify" in lines[0]
    return lines[0]


def test_export_refuses_a_corrupt_file_and_writes_nothing(corrupt, tmp_path):
    for out in (tmp_path / "hf", tmp_path / "one.safetensors"):
        _refused(run_apr("export", corrupt, "-o", out), corrupt)
        assert not out.exists()
    _refused(run_apr("export", corrupt, "-o", "-"), corrupt)


def test_export_no_verify_passes_it_loudly(corrupt, tmp_path):
    proc = run_apr("export", corrupt, "-o", tmp_path / "hf", "-q", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert "apr: warning:" in proc.stderr and "--no-verify" in proc.stderr
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_diff_refuses_a_corrupt_file_instead_of_calling_it_identical(corrupt):
    _refused(run_apr("diff", SOURCE, corrupt), corrupt)
    _refused(run_apr("diff", corrupt, SOURCE), corrupt)
    assert run_apr("diff", SOURCE, SOURCE, "-q").returncode == 0


def test_convert_from_a_corrupt_apr_is_refused(corrupt, tmp_path):
    out = tmp_path / "re.apr"
    _refused(run_apr("convert", corrupt, "-o", out), corrupt)
    assert not out.exists()


def test_header_only_commands_say_the_checksum_was_not_verified(tmp_path):
    appended = _append_garbage(SOURCE, tmp_path / "appended.apr")
    for command in ("inspect", "tensors"):
        clean = run_apr_json(command, SOURCE)
        assert clean["checksum"] == "not verified" and clean["trailing_bytes"] == 0
        doc = run_apr_json(command, appended)
        assert doc["checksum"] == "not verified" and doc["trailing_bytes"] == 1000
    human = run_apr("inspect", appended, check=True).stdout
    assert "1,000 bytes after the data section" in human and "not verified" in human


def test_streaming_verifier_matches_verify_whatever_the_read_order(tmp_path):
    with open_apr(SOURCE) as f:
        check = StreamingVerifier(f)
        for info in reversed(f.tensors()):  # out of order: later reads fill the gaps
            check.feed(f.header.data_offset + info.offset, f.stored(info.name))
        check.finish()
    bad = _flip_weight_byte(SOURCE, tmp_path / "bad.apr")
    with open_apr(bad) as f:
        check = StreamingVerifier(f)
        for info in f.tensors():
            check.feed(f.header.data_offset + info.offset, f.stored(info.name))
        with pytest.raises(FooterChecksum, match="footer CRC-32 mismatch"):
            check.finish()


def test_init_refuses_a_corrupt_file(tmp_path):
    bad = _flip_weight_byte(SOURCE, tmp_path / "bad.apr")
    with pytest.raises(FooterChecksum):
        load_init_tensors(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_init_refuses_non_finite_weights(tmp_path, value):
    with open_apr(SOURCE) as f:
        tensors = {name: np.array(f[name]) for name in f.keys()}
        meta = dict(f.metadata)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    path = tmp_path / "nan.apr"
    save_apr(path, tensors, meta)
    with pytest.raises(NonFiniteWeights, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as caught:
        load_init_tensors(path)
    assert ("1 NaN" if np.isnan(value) else "1 Inf") in str(caught.value)


def test_pretrain_init_refuses_non_finite_weights_in_one_line(tmp_path):
    with open_apr(SOURCE) as f:
        tensors = {name: np.array(f[name]) for name in f.keys()}
        meta = dict(f.metadata)
        vocab = f.info("model.embed_tokens.weight").shape[0]
    tensors["model.norm.weight"][0] = np.nan
    save_apr(tmp_path / "nan.apr", tensors, meta)
    (np.arange(4096, dtype="<u4") % vocab).tofile(tmp_path / "t.bin")
    proc = run_apr("pretrain", "--init", tmp_path / "nan.apr", "--data", tmp_path / "t.bin", "-o", tmp_path / "run",
                   "--check-only", "--device", "cpu", "--seq-len", "16", "--batch-size", "2")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("apr: error:") and "model.norm.weight (1 NaN, 0 Inf)" in last, proc.stderr
