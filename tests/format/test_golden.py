"""The golden files: every valid one reads as expected.json says, every broken one is refused."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from apr_format import AprWriter, Flag, errors, open_apr
from apr_format.validate import validate_file
from apr_testing import GOLDEN

EXPECTED = json.loads((GOLDEN / "expected.json").read_text(encoding="utf-8"))
VALID = sorted(name for name, spec in EXPECTED.items() if spec["valid"])
# broken file -> (error class open_apr raises, the validate check that fails)
BROKEN = {
    "bad-header-checksum.apr": (errors.HeaderChecksum, "header checksum"),
    "bad-magic.apr": (errors.BadMagic, "magic"),
    "column-major.apr": (errors.ColumnMajor, "flags"),
    "huge-tensor-count.apr": (errors.CorruptIndex, "tensor index"),
    "legacy-v1-aprn.apr": (errors.LegacyFormat, "magic"),
    "truncated.apr": (errors.Truncated, "tensor bounds"),
}


def test_every_golden_file_is_described():
    on_disk = {p.name for p in GOLDEN.glob("*.apr")}
    assert on_disk == set(EXPECTED)
    assert set(BROKEN) | {"bad-footer-checksum.apr"} == {n for n, s in EXPECTED.items() if not s["valid"]}


@pytest.mark.parametrize("name", VALID)
def test_valid_golden_matches_expected(name):
    spec = EXPECTED[name]
    with open_apr(GOLDEN / name) as f:
        assert f.file_size == spec["file_size"]
        assert int(f.flags) == spec["flags"]
        assert f.flags == Flag.LAYOUT_ROW_MAJOR
        assert f.metadata == spec["metadata"]
        assert f.keys() == sorted(spec["tensors"], key=lambda n: n.encode("utf-8"))
        for tensor, want in spec["tensors"].items():
            info = f.info(tensor)
            assert (info.dtype, list(info.shape), info.nbytes) == (want["dtype"], want["shape"], want["nbytes"])
            assert hashlib.sha256(f.raw(tensor)).hexdigest() == want["sha256"]
            total = float(f.to_float32(tensor).astype(np.float64).sum())
            assert total == pytest.approx(want["sum_f32"], rel=1e-6, abs=1e-6), tensor
            assert f[tensor].shape == tuple(want["shape"])
        f.verify()


@pytest.mark.parametrize("name", VALID)
def test_valid_golden_validates(name):
    report = validate_file(GOLDEN / name)
    assert report.failed == 0, report.checks
    assert report.total_tensors == len(EXPECTED[name]["tensors"])
    assert (report.total_nan, report.total_inf) == (0, 0)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_golden_is_refused(name):
    error_class, check = BROKEN[name]
    path = GOLDEN / name
    with pytest.raises(error_class) as caught:
        open_apr(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)
    report = validate_file(path)
    assert [c.name for c in report.checks if c.status == "FAIL"] == [check]
    assert report.checks[-1].detail == caught.value.problem


def test_legacy_v1_message_names_the_version():
    with pytest.raises(errors.LegacyFormat, match="APR v1"):
        open_apr(GOLDEN / "legacy-v1-aprn.apr")


def test_bad_footer_checksum_opens_but_fails_verify_and_validate():
    path = GOLDEN / "bad-footer-checksum.apr"
    with open_apr(path) as f:
        assert len(f) == 21
        with pytest.raises(errors.FooterChecksum, match="footer CRC-32 mismatch"):
            f.verify()
    report = validate_file(path)
    assert [(c.name, c.status) for c in report.checks if c.status == "FAIL"] == [("footer checksum", "FAIL")]
    assert report.failed == 1


@pytest.mark.parametrize("name", VALID)
@pytest.mark.parametrize("via", ["raw", "numpy"])
def test_rewriting_a_golden_gives_identical_bytes(name, via, tmp_path):
    src, out = GOLDEN / name, tmp_path / name
    with open_apr(src) as f:
        with AprWriter(out, f.metadata, flags=f.flags) as w:
            for info in f.tensors():
                data = bytes(f.raw(info.name)) if via == "raw" else np.array(f[info.name])
                w.add(info.name, data, dtype=info.dtype, shape=info.shape)
    assert out.read_bytes() == src.read_bytes()
