"""HF -> APR -> HF on real transformers checkpoints: identical files, identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apr_format import Flag, open_apr
from apr_converters.apr_to_hf import export_apr_to_hf
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_testing import assert_same_folder

ALIASES = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "n_layer")


@pytest.mark.parametrize("fixture", ["hf_qwen2", "hf_llama", "hf_qwen2_bf16", "hf_qwen2_sharded", "hf_llama_sharded"])
def test_round_trip_gives_back_identical_files(fixture, request, tmp_path):
    source: Path = request.getfixturevalue(fixture)
    apr = tmp_path / "model.apr"
    convert_hf_to_apr(source, apr)
    export_apr_to_hf(apr, tmp_path / "out")
    assert_same_folder(source, tmp_path / "out")


@pytest.mark.parametrize("fixture", ["hf_qwen2_bf16", "hf_qwen2_sharded"])
def test_bf16_bytes_are_copied_unchanged(fixture, request, tmp_path):
    import torch
    from safetensors.torch import load_file

    source: Path = request.getfixturevalue(fixture)
    convert_hf_to_apr(source, tmp_path / "m.apr")
    originals = {}
    for f in source.glob("*.safetensors"):
        originals.update(load_file(f))
    with open_apr(tmp_path / "m.apr") as apr:
        assert {t.dtype for t in apr.tensors()} == {"bf16"}
        for name, tensor in originals.items():
            assert bytes(apr.raw(name)) == tensor.view(torch.uint8).numpy().tobytes(), name


def test_qwen2_metadata_follows_aprender_conventions(hf_qwen2, tmp_path):
    report = convert_hf_to_apr(hf_qwen2, tmp_path / "q.apr")
    config = json.loads((hf_qwen2 / "config.json").read_text())
    with open_apr(tmp_path / "q.apr") as apr:
        meta = apr.metadata
        assert apr.flags == Flag.LAYOUT_ROW_MAJOR  # exactly 0x0400: no tokenizer, no compression
        assert meta["model_type"] == "qwen2" and meta["architecture"] == "qwen2" and meta["hf_model_type"] == "qwen2"
        expected = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=300,
                        intermediate_size=128, max_position_embeddings=128, rope_type=2)
        assert {k: meta[k] for k in expected} == expected
        assert meta["rope_theta"] == 1000000.0 and isinstance(meta["rope_theta"], float)
        assert meta["rms_norm_eps"] == 1e-6
        assert meta["tied_embeddings"] is True
        assert meta["original_format"] == "safetensors" and meta["source"] == str(hf_qwen2)
        assert meta["created_at"].endswith("Z")
        assert meta["hf_config"] == config
        assert not set(ALIASES) & set(meta), "an alias next to its canonical key breaks aprender"
        # aprender's tied head: lm_head.weight is a byte copy of the embedding
        assert bytes(apr.raw("lm_head.weight")) == bytes(apr.raw("model.embed_tokens.weight"))
        assert meta["param_count"] == report.param_count == 93504  # the tied head counted once
        assert meta["total_size"] == sum(t.nbytes for t in apr.tensors())
        for i in range(2):
            for p in ("q", "k", "v"):
                assert f"model.layers.{i}.self_attn.{p}_proj.bias" in apr
    assert report.lm_head_copy and report.tensor_count == 27 and report.family == "qwen2"


def test_llama_keeps_its_untied_head(hf_llama, tmp_path):
    report = convert_hf_to_apr(hf_llama, tmp_path / "l.apr")
    with open_apr(tmp_path / "l.apr") as apr:
        assert apr.metadata["tied_embeddings"] is False
        assert apr.metadata["rope_type"] == 2 and apr.metadata["head_dim"] == 16
        assert bytes(apr.raw("lm_head.weight")) != bytes(apr.raw("model.embed_tokens.weight"))
        assert not any(name.endswith("q_proj.bias") for name in apr.keys())
    assert not report.lm_head_copy and report.tensor_count == 21


def test_no_lm_head_copy_option(hf_qwen2, tmp_path):
    report = convert_hf_to_apr(hf_qwen2, tmp_path / "q.apr", lm_head_copy=False)
    with open_apr(tmp_path / "q.apr") as apr:
        assert "lm_head.weight" not in apr and apr.metadata["tied_embeddings"] is True
    assert not report.lm_head_copy
    export_apr_to_hf(tmp_path / "q.apr", tmp_path / "out")
    assert_same_folder(hf_qwen2, tmp_path / "out")


@pytest.mark.parametrize("fixture,family", [("hf_qwen2", "qwen2"), ("hf_llama", "llama")])
def test_exported_model_gives_the_same_logits(fixture, family, request, tmp_path):
    import torch
    import transformers

    source: Path = request.getfixturevalue(fixture)
    convert_hf_to_apr(source, tmp_path / "m.apr")
    export_apr_to_hf(tmp_path / "m.apr", tmp_path / "out", max_shard_size="150KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    exported, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)


def test_dtype_cast_matches_torch(hf_qwen2, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file

    from apr_converters import hf_to_apr

    monkeypatch.setattr(hf_to_apr, "CHUNK_VALUES", 1000)  # cast in many chunks

    originals = load_file(hf_qwen2 / "model.safetensors")
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        report = convert_hf_to_apr(hf_qwen2, tmp_path / f"{dtype}.apr", dtype=dtype)
        assert report.dtypes == {dtype: 27}
        with open_apr(tmp_path / f"{dtype}.apr") as apr:
            assert apr.metadata["hf_config"]["dtype"] == str(torch_dtype).removeprefix("torch.")
            for name, tensor in originals.items():
                assert torch.equal(apr.torch(name), tensor.to(torch_dtype)), name


def test_dtype_f32_from_bf16_is_exact(hf_qwen2_bf16, tmp_path):
    convert_hf_to_apr(hf_qwen2_bf16, tmp_path / "bf16.apr")
    convert_hf_to_apr(hf_qwen2_bf16, tmp_path / "f32.apr", dtype="f32")
    with open_apr(tmp_path / "bf16.apr") as a, open_apr(tmp_path / "f32.apr") as b:
        for name in a.keys():
            assert b.info(name).dtype == "f32"
            np.testing.assert_array_equal(a.to_float32(name), b[name])


def test_generic_encoder_converts_and_round_trips(hf_bert, tmp_path):
    report = convert_hf_to_apr(hf_bert, tmp_path / "b.apr")
    assert report.family is None and report.architecture == "bert"
    assert any("no family table" in w for w in report.warnings)
    with open_apr(tmp_path / "b.apr") as apr:
        meta = apr.metadata
        assert meta["architecture"] == "bert" and meta["model_type"] == "bert"
        assert meta["hidden_size"] == 32 and meta["num_layers"] == 2 and meta["num_heads"] == 2
        assert "rope_type" not in meta and "lm_head.weight" not in apr
        assert "embeddings.word_embeddings.weight" in apr
    export_apr_to_hf(tmp_path / "b.apr", tmp_path / "out")
    assert_same_folder(hf_bert, tmp_path / "out")


def test_extra_tensors_are_kept_and_reported(hf_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_llama / "config.json").read_bytes())
    tensors = load_file(hf_llama / "model.safetensors")
    tensors["model.rotary_emb.inv_freq"] = np.arange(8, dtype=np.float32)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    report = convert_hf_to_apr(folder, tmp_path / "l.apr")
    assert report.extra_tensors == ["model.rotary_emb.inv_freq"]
    with open_apr(tmp_path / "l.apr") as apr:
        np.testing.assert_array_equal(apr["model.rotary_emb.inv_freq"], np.arange(8, dtype=np.float32))


def test_bare_safetensors_with_and_without_config(hf_llama, tmp_path):
    bare = hf_llama / "model.safetensors"
    report = convert_hf_to_apr(bare, tmp_path / "bare.apr")
    assert report.architecture is None and any("--config" in w for w in report.warnings)
    with open_apr(tmp_path / "bare.apr") as apr:
        assert "architecture" not in apr.metadata and "hidden_size" not in apr.metadata
        assert len(apr) == 21
    report = convert_hf_to_apr(bare, tmp_path / "cfg.apr", config_path=hf_llama / "config.json")
    assert report.family == "llama"
    with open_apr(tmp_path / "cfg.apr") as apr:
        assert apr.metadata["num_layers"] == 2 and apr.metadata["architecture"] == "llama"


def test_zstd_extension_round_trips(hf_qwen2_bf16, tmp_path):
    convert_hf_to_apr(hf_qwen2_bf16, tmp_path / "z.apr", compression="zstd")
    with open_apr(tmp_path / "z.apr") as apr:
        assert apr.flags & Flag.ZSTD
    export_apr_to_hf(tmp_path / "z.apr", tmp_path / "out")
    assert_same_folder(hf_qwen2_bf16, tmp_path / "out")


def test_progress_reports_every_byte(hf_llama, tmp_path):
    calls = []
    report = convert_hf_to_apr(hf_llama, tmp_path / "l.apr", progress=lambda *a: calls.append(a))
    assert len(calls) == report.tensor_count
    assert sum(c[1] for c in calls) == report.total_size and {c[2] for c in calls} == {report.total_size}
