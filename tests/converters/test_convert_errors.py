"""Broken HF checkpoints: one clear error naming the problem, and no output left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from apr_format.errors import (
    CorruptSource, InvalidArgument, MissingTensor, OutputExists, ShapeMismatch, Truncated, UnknownDType,
)
from apr_converters.hf_to_apr import convert_hf_to_apr


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite(folder: Path, edit) -> None:
    """Rewrite model.safetensors after `edit(tensors)` changed the name -> array dict."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def assert_nothing_written(folder: Path) -> None:
    assert os.listdir(folder) == [], os.listdir(folder)


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_missing_tensor_is_named(hf_llama, tmp_path, out):
    src = copy_folder(hf_llama, tmp_path / "src")
    rewrite(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensor) as err:
        convert_hf_to_apr(src, out / "m.apr")
    assert str(err.value) == (
        f"{src}: tensor 'model.layers.1.mlp.up_proj.weight' is missing: llama with this config needs [128, 64]"
    )
    assert_nothing_written(out)


def test_missing_qwen2_bias_is_an_error(hf_qwen2, tmp_path, out):
    src = copy_folder(hf_qwen2, tmp_path / "src")
    rewrite(src, lambda t: [t.pop(f"model.layers.{i}.self_attn.{p}_proj.bias") for i in (0, 1) for p in "qkv"])
    with pytest.raises(MissingTensor, match=r"'model.layers.0.self_attn.k_proj.bias' is missing \(and 5 more\)"):
        convert_hf_to_apr(src, out / "m.apr")
    assert_nothing_written(out)


def test_untied_model_without_head_is_an_error(hf_llama, tmp_path, out):
    src = copy_folder(hf_llama, tmp_path / "src")
    rewrite(src, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(MissingTensor, match="'lm_head.weight' is missing"):
        convert_hf_to_apr(src, out / "m.apr")


def test_wrong_shape_is_named(hf_llama, tmp_path, out):
    src = copy_folder(hf_llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatch) as err:
        convert_hf_to_apr(src, out / "m.apr")
    assert str(err.value) == (
        f"{src}: tensor 'model.layers.0.mlp.down_proj.weight' has shape [64, 128] but the llama config needs [64, 96]"
    )
    assert_nothing_written(out)


def test_truncated_shard(hf_qwen2_sharded, tmp_path, out):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    shard = src / "model-00003-of-00011.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(Truncated, match=r"model-00003-of-00011.safetensors: tensor '.*': bytes \d+\.\.\d+ lie beyond"):
        convert_hf_to_apr(src, out / "m.apr")
    assert_nothing_written(out)


def test_missing_shard_file(hf_qwen2_sharded, tmp_path, out):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    (src / "model-00002-of-00011.safetensors").unlink()
    with pytest.raises(CorruptSource, match=r"index.json: shard model-00002-of-00011.safetensors \(holding '.*'\) is missing"):
        convert_hf_to_apr(src, out / "m.apr")
    assert_nothing_written(out)


def _edit_index(folder: Path, edit) -> None:
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


def test_tensor_missing_from_index(hf_qwen2_sharded, tmp_path, out):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    _edit_index(src, lambda m: m.pop("model.norm.weight"))
    with pytest.raises(CorruptSource, match=r"tensor 'model.norm.weight' in model-\d+-of-00011.safetensors is not named by the index"):
        convert_hf_to_apr(src, out / "m.apr")
    assert_nothing_written(out)


def test_index_names_a_tensor_no_shard_holds(hf_qwen2_sharded, tmp_path, out):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    _edit_index(src, lambda m: m.update({"model.ghost.weight": "model-00001-of-00011.safetensors"}))
    with pytest.raises(CorruptSource, match="tensor 'model.ghost.weight' is listed in model-00001-of-00011.safetensors but no shard holds it"):
        convert_hf_to_apr(src, out / "m.apr")


def test_index_points_at_the_wrong_shard(hf_qwen2_sharded, tmp_path, out):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    wrong = "model-00001-of-00011.safetensors" if index["weight_map"]["model.norm.weight"] != "model-00001-of-00011.safetensors" \
        else "model-00002-of-00011.safetensors"
    _edit_index(src, lambda m: m.update({"model.norm.weight": wrong}))
    with pytest.raises(CorruptSource, match=f"tensor 'model.norm.weight' is listed in {wrong} but found in"):
        convert_hf_to_apr(src, out / "m.apr")


def test_shard_name_outside_the_folder(hf_qwen2_sharded, tmp_path, out):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    _edit_index(src, lambda m: m.update({"model.norm.weight": "../model.safetensors"}))
    with pytest.raises(CorruptSource, match="is not a file name in the folder"):
        convert_hf_to_apr(src, out / "m.apr")


def test_unknown_dtype_names_the_tensor(tmp_path, out):
    header = json.dumps({"flags": {"dtype": "BOOL", "shape": [4], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(UnknownDType, match="tensor 'flags': safetensors dtype BOOL has no APR equivalent"):
        convert_hf_to_apr(tmp_path / "x.safetensors", out / "m.apr")
    assert_nothing_written(out)


def test_folder_without_weights(tmp_path, out):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CorruptSource, match="only PyTorch .bin weights found"):
        convert_hf_to_apr(tmp_path / "empty", out / "m.apr")


def test_refuses_to_overwrite_without_force(hf_llama, tmp_path):
    dst = tmp_path / "m.apr"
    dst.write_bytes(b"keep me")
    with pytest.raises(OutputExists, match=r"already exists \(use --force to overwrite\)"):
        convert_hf_to_apr(hf_llama, dst)
    assert dst.read_bytes() == b"keep me"
    convert_hf_to_apr(hf_llama, dst, force=True)
    assert dst.read_bytes()[:4] == b"APR\x00"


def test_failed_overwrite_keeps_the_old_file(hf_llama, tmp_path):
    src = copy_folder(hf_llama, tmp_path / "src")
    rewrite(src, lambda t: t.pop("model.norm.weight"))
    dst = tmp_path / "m.apr"
    dst.write_bytes(b"keep me")
    with pytest.raises(MissingTensor):
        convert_hf_to_apr(src, dst, force=True)
    assert dst.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["m.apr", "src"]


def test_bad_dtype_argument(hf_llama, tmp_path):
    with pytest.raises(InvalidArgument, match="--dtype 'q8' is not one of f32, f16, bf16"):
        convert_hf_to_apr(hf_llama, tmp_path / "m.apr", dtype="q8")


def test_corrupt_tokenizer_json_is_an_error(hf_llama, tmp_path, out):
    src = copy_folder(hf_llama, tmp_path / "src")
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorruptSource, match="tokenizer.json: not valid JSON"):
        convert_hf_to_apr(src, out / "m.apr")
    assert_nothing_written(out)


def test_stale_total_size_is_a_warning(hf_qwen2_sharded, tmp_path):
    src = copy_folder(hf_qwen2_sharded, tmp_path / "src")
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["metadata"]["total_size"] += 2
    path.write_text(json.dumps(index))
    report = convert_hf_to_apr(src, tmp_path / "m.apr")
    assert any("total_size" in w and str(index["metadata"]["total_size"]) in w for w in report.warnings)
