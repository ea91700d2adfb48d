"""Fixtures of the reliability tests (their helpers live in apr_testing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apr_testing import write_hf_folder


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory) -> Path:
    """The numpy-built tiny Qwen2 HF folder."""
    return write_hf_folder(tmp_path_factory.mktemp("tiny") / "hf")
