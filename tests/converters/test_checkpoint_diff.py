"""diff_checkpoints across .apr, .safetensors and HF folders: what counts, what does not, the numbers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from apr_format import open_apr, save_apr
from apr_converters import diff as diff_module
from apr_converters.apr_to_hf import export_apr_to_hf
from apr_converters.diff import diff_checkpoints
from apr_converters.hf_to_apr import convert_hf_to_apr


def test_hf_source_and_its_apr_are_identical(hf_qwen2, qwen_apr):
    result = diff_checkpoints(hf_qwen2, qwen_apr)
    data = result.to_dict()
    assert data["identical"] is True and data["difference_count"] == 0
    assert data["kinds"] == ["hf", "apr"] and data["metadata"]["compared"] == "architecture"
    assert data["only_in_b"] == [] and data["tensor_summary"] == {"common": 26, "identical": 26, "different": 0}
    assert any("lm_head.weight" in note and "copy" in note and "not counted" in note for note in data["notes"])
    json.dumps(data)  # JSON-ready


def test_every_input_kind_combination(hf_qwen2, qwen_apr, tmp_path):
    export_apr_to_hf(qwen_apr, tmp_path / "out")
    bare = hf_qwen2 / "model.safetensors"
    for a, b in [(qwen_apr, tmp_path / "out"), (bare, qwen_apr), (hf_qwen2, tmp_path / "out"), (qwen_apr, qwen_apr)]:
        assert diff_checkpoints(a, b).identical, (a, b)


def test_changed_tensor_numbers(hf_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(hf_llama, src)
    tensors = load_file(src / "model.safetensors")
    original = tensors["model.norm.weight"].copy()
    tensors["model.norm.weight"][3] += 0.5
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    result = diff_checkpoints(hf_llama, src)
    assert not result.identical and result.difference_count == 2
    changed = {t.name: t for t in result.changed}
    norm = changed["model.norm.weight"]
    assert norm.max_abs_diff == pytest.approx(0.5)
    assert norm.rel_l2 == pytest.approx(0.5 / float(np.linalg.norm(original.astype(np.float64))))
    cast = changed["model.layers.0.mlp.up_proj.weight"]
    assert cast.dtype == ("f32", "f16") and not cast.bytes_identical and 0 < cast.max_abs_diff < 1e-3


def test_names_shapes_and_metadata(hf_qwen2, hf_llama):
    data = diff_checkpoints(hf_qwen2, hf_llama).to_dict()
    assert data["metadata"]["compared"] == "config"
    keys = {d["key"] for d in data["metadata"]["differences"]}
    assert {"model_type", "vocab_size", "tie_word_embeddings", "rope_parameters.rope_theta"} <= keys
    assert "model.layers.0.self_attn.q_proj.bias" in data["only_in_a"] and data["only_in_b"] == ["lm_head.weight"]
    embed = next(t for t in data["tensors"] if t["name"] == "model.embed_tokens.weight")
    assert embed["shape"] == [[300, 64], [320, 64]] and embed["max_abs_diff"] is None


def test_apr_metadata_ignores_when_and_where(hf_qwen2, tmp_path):
    convert_hf_to_apr(hf_qwen2, tmp_path / "a.apr")
    shutil.copytree(hf_qwen2, tmp_path / "elsewhere")
    convert_hf_to_apr(tmp_path / "elsewhere", tmp_path / "b.apr")
    result = diff_checkpoints(tmp_path / "a.apr", tmp_path / "b.apr")
    assert result.identical and "source" in result.metadata_ignored
    convert_hf_to_apr(hf_qwen2, tmp_path / "c.apr", lm_head_copy=False)
    result = diff_checkpoints(tmp_path / "a.apr", tmp_path / "c.apr")
    assert result.only_in_a == [] and [d["key"] for d in result.metadata_differences] == ["total_size"]


def test_chunked_compare_matches_whole(monkeypatch, tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((37, 11)).astype(np.float32)
    b = a + rng.standard_normal(a.shape).astype(np.float32) * 1e-3
    b[5, 5] = np.nan
    save_apr(tmp_path / "a.apr", {"t": a})
    save_apr(tmp_path / "b.apr", {"t": b})
    monkeypatch.setattr(diff_module, "CHUNK_VALUES", 10)
    monkeypatch.setattr(diff_module, "CHUNK", 64)
    save_apr(tmp_path / "a2.apr", {"t": a})
    assert diff_checkpoints(tmp_path / "a.apr", tmp_path / "a2.apr").identical
    b2 = a.copy()
    b2[-1, -1] += 1
    save_apr(tmp_path / "b2.apr", {"t": b2})
    (last,) = diff_checkpoints(tmp_path / "a.apr", tmp_path / "b2.apr").tensors
    assert not last.bytes_identical and last.max_abs_diff == pytest.approx(1.0, rel=1e-6)
    (t,) = diff_checkpoints(tmp_path / "a.apr", tmp_path / "b.apr").tensors
    keep = ~np.isnan(b)
    d = (a.astype(np.float64) - b.astype(np.float64))[keep]
    assert t.nan_mismatches == 1
    assert t.max_abs_diff == pytest.approx(np.abs(d).max())
    assert t.rel_l2 == pytest.approx(np.linalg.norm(d) / np.linalg.norm(a.astype(np.float64)[keep]))


def test_quantized_tensors_compare_by_value(tmp_path):
    from apr_format import AprWriter
    from apr_format.quants import quantize_q8

    values = np.linspace(-1, 1, 64, dtype=np.float32)
    with AprWriter(tmp_path / "q.apr", {}) as w:
        w.add("t", quantize_q8(values), dtype="q8", shape=(64,))
    save_apr(tmp_path / "f.apr", {"t": values})
    (t,) = diff_checkpoints(tmp_path / "f.apr", tmp_path / "q.apr").tensors
    with open_apr(tmp_path / "q.apr") as q:
        expected = np.abs(q.to_float32("t") - values).max()
    assert t.dtype == ("f32", "q8") and t.max_abs_diff == pytest.approx(float(expected))


def test_infinities_and_json(tmp_path):
    a = np.array([np.inf, -np.inf, 1.0, 0.0], dtype=np.float32)
    b = np.array([np.inf, -np.inf, 1.0, np.inf], dtype=np.float32)
    save_apr(tmp_path / "a.apr", {"t": a})
    save_apr(tmp_path / "b.apr", {"t": b})
    data = diff_checkpoints(tmp_path / "a.apr", tmp_path / "b.apr").to_dict()
    assert data["tensors"][0]["max_abs_diff"] == "inf"
    json.loads(json.dumps(data, allow_nan=False))
