"""apr_format as another tool imports it: real bf16 arrays, a read-only mapping, errors that are also the
builtin exceptions callers catch, and docstrings that say what comes back and what is raised."""

from __future__ import annotations

import inspect
import pydoc

import ml_dtypes
import numpy as np
import pytest

import apr_format
from apr_format import AprError, FileMissing, MissingTensor, NotAFile, open_apr, save_apr
from apr_testing import GOLDEN

TINY = GOLDEN / "tiny-qwen2.apr"  # bf16


def test_bf16_tensors_are_real_bfloat16_arrays_with_the_bits_one_call_away():
    with open_apr(TINY) as f:
        norm = f["model.norm.weight"]
        assert norm.dtype == ml_dtypes.bfloat16 and norm.shape == f.info("model.norm.weight").shape
        expected = f.to_float32("model.norm.weight")
        assert np.array_equal(norm.astype(np.float32), expected)
        assert float(norm.astype(np.float32).mean()) == pytest.approx(float(expected.mean()))
        bits = f.bits("model.norm.weight")
        assert bits.dtype == np.uint16 and np.array_equal(bits, norm.view(np.uint16))


def test_bf16_arrays_round_trip_through_save_apr(tmp_path):
    values = np.array([[1.5, -2.25], [3e38, 1e-38]], dtype=ml_dtypes.bfloat16)
    save_apr(tmp_path / "b.apr", {"w": values})
    with open_apr(tmp_path / "b.apr") as f:
        assert f.info("w").dtype == "bf16" and np.array_equal(f["w"], values)


def test_aprfile_is_a_read_only_mapping():
    from collections.abc import Mapping

    with open_apr(TINY) as f:
        assert isinstance(f, Mapping)
        assert "model.norm.weight" in f and "nope" not in f
        assert f.get("nope") is None and f.get("nope", 7) == 7
        assert f.get("model.norm.weight").dtype == ml_dtypes.bfloat16
        items = dict(f.items())
        assert list(items) == f.keys() and len(items) == len(f)
        with pytest.raises(KeyError) as caught:
            f["nope"]
        assert isinstance(caught.value, MissingTensor) and isinstance(caught.value, AprError)
        assert str(caught.value) == f"{TINY}: no tensor named 'nope'"
        with pytest.raises(TypeError):
            f["x"] = 1  # type: ignore[index]


def test_missing_and_unreadable_paths_are_apr_errors_and_os_errors(tmp_path):
    with pytest.raises(FileMissing) as missing:
        open_apr(tmp_path / "absent.apr")
    assert isinstance(missing.value, FileNotFoundError) and missing.value.errno == 2
    assert str(missing.value) == f"{tmp_path / 'absent.apr'}: No such file or directory"
    with pytest.raises(NotAFile) as folder:
        open_apr(tmp_path)
    assert isinstance(folder.value, IsADirectoryError) and isinstance(folder.value, AprError)
    from apr_format.validate import validate_file

    with pytest.raises(FileMissing):
        validate_file(tmp_path / "absent.apr")
    with pytest.raises(FileMissing):
        apr_format.read_architecture(tmp_path / "absent.apr")


def test_public_functions_say_what_they_return_and_raise():
    for name in apr_format.__all__:
        obj = getattr(apr_format, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert "Raises" in doc and len(doc.splitlines()) > 2, name
    doc = inspect.getdoc(apr_format.open_apr)
    assert "Returns:" in doc and "FileMissing" in doc
    for method in ("__getitem__", "bits", "info", "raw", "to_float32", "verify"):
        assert "Raises" in inspect.getdoc(getattr(apr_format.AprFile, method)), method


def test_help_of_the_package_is_a_usable_reference():
    text = pydoc.render_doc(apr_format, renderer=pydoc.plaintext)
    for words in ("open_apr(", "save_apr(", "bfloat16", "AprError", "StreamingVerifier", "KeyError"):
        assert words in text, words
