"""AprError names what it is about: a path, a flag or an environment variable, each in its own field."""

from __future__ import annotations

import pytest

from apr_format import errors


def test_path_flag_and_variable_are_separate_fields():
    by_path = errors.InvalidArgument("data/x.bin", "holds 3 tokens")
    by_flag = errors.InvalidArgument(None, "must be at least 1, got 0", flag="--seq-len")
    by_variable = errors.InvalidArgument(None, "environment variable is not an integer: 'x'", variable="RANK")
    assert (str(by_path), by_path.path, by_path.flag, by_path.variable) == (
        "data/x.bin: holds 3 tokens", "data/x.bin", None, None)
    assert (str(by_flag), by_flag.path, by_flag.flag) == ("--seq-len: must be at least 1, got 0", None, "--seq-len")
    assert (str(by_variable), by_variable.path, by_variable.variable) == (
        "RANK: environment variable is not an integer: 'x'", None, "RANK")


@pytest.mark.parametrize("cls", [errors.CorruptTensorData, errors.InvalidArchitectureConfig])
def test_new_classes_are_their_own_failures(cls):
    assert issubclass(cls, errors.AprError)
    assert not issubclass(cls, (errors.CorruptIndex, errors.CorruptMetadata))
