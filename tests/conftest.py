"""Shared session fixtures: tiny real HF checkpoints built with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from apr_testing import build_hf_checkpoint


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory) -> Path:
    """A tiny tied-embedding Qwen2 checkpoint in float32."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny untied Llama checkpoint in float32."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("hf") / "llama", "llama")
