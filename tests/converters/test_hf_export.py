"""apr -> HF export: sharding limits, single-file output, refusals, atomicity, carried files."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from apr_format import save_apr
from apr_format.errors import InvalidArgument, OutputExists, UnsupportedFeature
from apr_converters.apr_to_hf import export_apr_to_hf, export_apr_to_safetensors, parse_size
from apr_converters.hf_to_apr import convert_hf_to_apr

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "fixtures" / "tiny-qwen2-hf"


def test_every_shard_fits_the_limit(qwen_apr, tmp_path):
    report = export_apr_to_hf(qwen_apr, tmp_path / "out", max_shard_size="50KB")
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(f for f in report.files if f.startswith("model-"))
    assert index["metadata"]["total_size"] == report.total_size == 374016
    assert "lm_head.weight" not in index["weight_map"] and report.dropped == ["lm_head.weight"]
    from safetensors import safe_open

    for shard in shards:
        size = (out / shard).stat().st_size
        with safe_open(out / shard, framework="np") as f:
            names = list(f.keys())
            assert f.metadata() == {"format": "pt"}
        # only a shard holding a single tensor larger than the limit may exceed it
        assert size <= 50_000 or len(names) == 1, (shard, size, names)
    assert (out / "model.safetensors.index.json").read_text().endswith("\n")


def test_export_loads_in_transformers_with_no_key_problems(qwen_apr, tmp_path):
    import transformers

    export_apr_to_hf(qwen_apr, tmp_path / "out", max_shard_size="100KB")
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_single_safetensors_file_and_stream(qwen_apr, hf_qwen2, tmp_path):
    report = export_apr_to_safetensors(qwen_apr, tmp_path / "m.safetensors")
    assert report.files == [str(tmp_path / "m.safetensors")]
    assert (tmp_path / "m.safetensors").read_bytes() == (hf_qwen2 / "model.safetensors").read_bytes()
    stream = io.BytesIO()
    export_apr_to_safetensors(qwen_apr, stream)
    assert stream.getvalue() == (hf_qwen2 / "model.safetensors").read_bytes()


def test_refuses_a_non_empty_folder_without_force(qwen_apr, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists, match=r"already exists and is not empty \(use --force to replace it\)"):
        export_apr_to_hf(qwen_apr, out)
    assert os.listdir(out) == ["keep.txt"]
    export_apr_to_hf(qwen_apr, out, force=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folders left


def test_refuses_an_existing_file_without_force(qwen_apr, tmp_path):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"mine")
    with pytest.raises(OutputExists):
        export_apr_to_safetensors(qwen_apr, dst)
    assert dst.read_bytes() == b"mine"


def test_quantized_tensors_are_refused_and_nothing_is_written(tmp_path):
    from apr_format import AprWriter

    with AprWriter(tmp_path / "q8.apr", {"architecture": "llama"}) as w:
        w.add("w", np.zeros(4 + 32, dtype=np.uint8), dtype="q8", shape=(32,))
    with pytest.raises(UnsupportedFeature, match="tensor 'w' is q8: safetensors cannot hold quantized tensors"):
        export_apr_to_hf(tmp_path / "q8.apr", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [f for f in os.listdir(tmp_path) if "apr-tmp" in f]


def test_tied_model_with_a_different_head_is_refused(tmp_path):
    embed = np.ones((8, 4), dtype=np.float32)
    save_apr(tmp_path / "t.apr", {"model.embed_tokens.weight": embed, "lm_head.weight": embed * 2},
             {"architecture": "llama", "tied_embeddings": True})
    with pytest.raises(InvalidArgument, match="tied but 'lm_head.weight' differs from 'model.embed_tokens.weight'"):
        export_apr_to_hf(tmp_path / "t.apr", tmp_path / "out")


def test_config_rebuilt_from_metadata_without_hf_config(hf_llama, tmp_path):
    import transformers

    from apr_format import open_apr

    convert_hf_to_apr(hf_llama, tmp_path / "l.apr")
    with open_apr(tmp_path / "l.apr") as apr:
        meta = {k: v for k, v in apr.metadata.items() if k != "hf_config"}
        tensors = {name: apr[name].copy() for name in apr.keys()}
    save_apr(tmp_path / "bare.apr", tensors, meta)
    export_apr_to_hf(tmp_path / "bare.apr", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["num_key_value_heads"] == 2
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_checked_in_fixture_round_trips_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    convert_hf_to_apr(FIXTURE, tmp_path / "t.apr")
    export_apr_to_hf(tmp_path / "t.apr", tmp_path / "out")
    for name in os.listdir(FIXTURE):
        assert (tmp_path / "out" / name).read_bytes() == (FIXTURE / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.eos_token == "<|im_end|>" and len(tok) == 400


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("64KiB", 65536),
                                        ("1.5GB", 1_500_000_000), ("1000", 1000), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["two GB", "5XB", "0", "-1GB"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidArgument):
        parse_size(text)
