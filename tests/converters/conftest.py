"""Fixtures for converter tests: bf16, sharded and encoder checkpoints built with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from apr_converters.hf_to_apr import convert_hf_to_apr

from apr_testing import build_hf_checkpoint


@pytest.fixture(scope="session")
def hf_qwen2_bf16(tmp_path_factory) -> Path:
    """The tiny tied Qwen2 in bfloat16, one file."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("hf") / "qwen2-bf16", "qwen2", dtype="bfloat16")


@pytest.fixture(scope="session")
def hf_qwen2_sharded(tmp_path_factory) -> Path:
    """The tiny tied Qwen2 in bfloat16 split into many shards with an index."""
    return build_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "qwen2-sharded", "qwen2", dtype="bfloat16", max_shard_size="20KB"
    )


@pytest.fixture(scope="session")
def hf_llama_sharded(tmp_path_factory) -> Path:
    """The tiny untied Llama in float32 split into shards with an index."""
    return build_hf_checkpoint(tmp_path_factory.mktemp("hf") / "llama-sharded", "llama", max_shard_size="100KB")


@pytest.fixture(scope="session")
def hf_bert(tmp_path_factory) -> Path:
    """A tiny BERT encoder (no family table: converted generically)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("hf") / "bert"
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_apr(hf_qwen2, tmp_path_factory) -> Path:
    """The tiny tied Qwen2 converted to .apr (one per test module)."""
    path = tmp_path_factory.mktemp("apr") / "q.apr"
    convert_hf_to_apr(hf_qwen2, path)
    return path
