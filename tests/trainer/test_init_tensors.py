"""load_init_tensors: strict names and shapes, tied heads, unused tensors, dtypes, quantized tensors, lifetime."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import numpy as np
import pytest
import torch

from apr_format import ArchitectureConfig, AprWriter, save_apr
from apr_format.errors import InvalidArgument, MissingTensor, ShapeMismatch, UnsupportedFeature
from apr_format.init_tensors import UnusedTensorWarning, expected_parameter_shapes, load_init_tensors
from apr_format.quants import dequantize_q4, dequantize_q8, quantize_q4, quantize_q8

LLAMA = ArchitectureConfig(
    family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
    vocab_size=40, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    attention_bias=False,
)
QWEN2 = dataclasses.replace(LLAMA, family="qwen2", attention_bias=True, tie_word_embeddings=True)


def random_tensors(config: ArchitectureConfig, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator).to(dtype)
        for name, shape in expected_parameter_shapes(config).items()
    }


def write(path, config: ArchitectureConfig, tensors: dict, **extra_meta):
    save_apr(path, tensors, {**config.to_metadata(), **extra_meta})
    return path


def test_expected_shapes_per_family():
    llama, qwen = expected_parameter_shapes(LLAMA), expected_parameter_shapes(QWEN2)
    assert llama["model.layers.1.self_attn.k_proj.weight"] == (16, 32)
    assert llama["model.layers.0.self_attn.o_proj.weight"] == (32, 32)
    assert llama["lm_head.weight"] == (40, 32) and "lm_head.weight" not in qwen
    assert not any(name.endswith(".bias") for name in llama)
    assert {n for n in qwen if n.endswith(".bias")} == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"
    }
    assert sum(np.prod(s) for s in llama.values()) == LLAMA.param_count()
    assert sum(np.prod(s) for s in qwen.values()) == QWEN2.param_count()
    # HF Llama's attention_bias biases o_proj too; Qwen2 never biases o_proj.
    llama_bias = expected_parameter_shapes(dataclasses.replace(LLAMA, attention_bias=True))
    assert llama_bias["model.layers.0.self_attn.o_proj.bias"] == (32,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_tensor_keyed_by_parameter_name_bit_exact(tmp_path, dtype):
    tensors = random_tensors(LLAMA, dtype)
    loaded = load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))
    assert list(loaded) == list(expected_parameter_shapes(LLAMA))
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name
    apr_name = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    assert set(loaded.source_dtypes.values()) == {apr_name}


def test_file_dtype_tensors_are_views_that_outlive_the_file_handle(tmp_path):
    """Zero-copy: the tensors are not torch-owned allocations, and stay valid after the handle is gone."""
    tensors = random_tensors(LLAMA)
    loaded = load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))
    gc.collect()
    assert not loaded["model.embed_tokens.weight"].untyped_storage().resizable()  # a foreign (mapped) buffer
    assert torch.equal(loaded["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    loaded["model.norm.weight"].add_(1)  # writable (private copy-on-write pages)
    cast = load_init_tensors(tmp_path / "m.apr", dtype="bf16")
    assert cast["model.norm.weight"].dtype == torch.bfloat16
    assert torch.equal(cast["model.norm.weight"], tensors["model.norm.weight"].bfloat16())


def test_dtype_names_and_bad_dtype(tmp_path):
    path = write(tmp_path / "m.apr", LLAMA, random_tensors(LLAMA, torch.bfloat16))
    assert load_init_tensors(path, dtype="float32")["lm_head.weight"].dtype == torch.float32
    assert load_init_tensors(path, dtype=torch.float16)["lm_head.weight"].dtype == torch.float16
    with pytest.raises(InvalidArgument, match="'int8' is not a floating-point torch dtype"):
        load_init_tensors(path, dtype="int8")


def test_all_missing_and_misshaped_tensors_in_one_error(tmp_path):
    tensors = random_tensors(LLAMA)
    del tensors["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(MissingTensor) as info:
        load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))
    message = str(info.value)
    assert message.startswith(str(tmp_path / "m.apr") + ": checkpoint does not match the architecture")
    assert "3 missing tensor(s): model.layers.{0,1}.mlp.up_proj.weight, model.norm.weight" in message
    assert "1 wrong shape(s) or dtype(s): model.layers.1.self_attn.k_proj.weight is [32, 32], expected [16, 32]" \
        in message
    assert "\n" not in message


def test_wrong_shape_alone_is_shape_mismatch(tmp_path):
    tensors = random_tensors(LLAMA)
    tensors["model.embed_tokens.weight"] = torch.zeros(41, 32)
    with pytest.raises(ShapeMismatch, match=r"model\.embed_tokens\.weight is \[41, 32\], expected \[40, 32\]"):
        load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))


def test_config_argument_overrides_the_file_and_is_checked(tmp_path):
    path = write(tmp_path / "m.apr", LLAMA, random_tensors(LLAMA))
    with pytest.raises(ShapeMismatch, match="wrong shape"):
        load_init_tensors(path, dataclasses.replace(LLAMA, intermediate_size=64))


def test_tied_head_copy_is_accepted_and_dropped(tmp_path):
    tensors = random_tensors(QWEN2)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    loaded = load_init_tensors(write(tmp_path / "m.apr", QWEN2, tensors, tied_embeddings=True))
    assert "lm_head.weight" not in loaded and loaded.dropped_tied_head and loaded.unused == ()


def test_tied_model_with_a_different_head_is_refused(tmp_path):
    tensors = random_tensors(QWEN2)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    with pytest.raises(InvalidArgument, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_init_tensors(write(tmp_path / "m.apr", QWEN2, tensors))


def test_untied_model_without_head_is_missing_tensor(tmp_path):
    tensors = random_tensors(LLAMA)
    del tensors["lm_head.weight"]
    with pytest.raises(MissingTensor, match=r"1 missing tensor\(s\): lm_head\.weight"):
        load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))


def test_unused_biases_are_an_error_not_silently_dropped(tmp_path):
    """aprender once dropped all 72 Qwen q/k/v biases: biases the architecture lacks are refused."""
    tensors = random_tensors(QWEN2)
    with pytest.raises(InvalidArgument) as info:
        load_init_tensors(write(tmp_path / "m.apr", QWEN2, tensors, attention_bias=False))
    assert str(info.value).endswith(
        "6 parameter(s) the architecture does not use: model.layers.{0,1}.self_attn.k_proj.bias, "
        "model.layers.{0,1}.self_attn.q_proj.bias, model.layers.{0,1}.self_attn.v_proj.bias"
    )


def test_extra_layers_are_an_error(tmp_path):
    tensors = random_tensors(dataclasses.replace(LLAMA, num_layers=6))
    with pytest.raises(InvalidArgument, match=r"36 parameter\(s\) .*model\.layers\.\{2-5\}\.mlp\.gate_proj\.weight"):
        load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))


def test_foreign_and_buffer_tensors_are_reported(tmp_path):
    tensors = random_tensors(LLAMA)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["vision_tower.proj.weight"] = torch.ones(2, 2)
    with pytest.warns(UnusedTensorWarning, match="2 tensor") as record:
        loaded = load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))
    assert "vision_tower.proj.weight" in str(record[0].message)
    assert loaded.unused == ("model.layers.0.self_attn.rotary_emb.inv_freq", "vision_tower.proj.weight")
    assert set(loaded) == set(expected_parameter_shapes(LLAMA))


def test_clean_file_warns_nothing(tmp_path):
    path = write(tmp_path / "m.apr", LLAMA, random_tensors(LLAMA))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_init_tensors(path).unused == ()


def test_quantized_tensors_are_dequantized(tmp_path):
    tensors = {name: t.numpy() for name, t in random_tensors(LLAMA).items()}
    q8_name, q4_name = "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    q8, q4 = quantize_q8(tensors.pop(q8_name)), quantize_q4(tensors.pop(q4_name))
    with AprWriter(tmp_path / "q.apr", LLAMA.to_metadata()) as writer:
        for name, array in tensors.items():
            writer.add(name, array)
        writer.add(q8_name, q8, dtype="q8", shape=(48, 32))
        writer.add(q4_name, q4, dtype="q4", shape=(32, 32))
    loaded = load_init_tensors(tmp_path / "q.apr")
    assert loaded[q8_name].dtype == torch.float32 and loaded[q8_name].shape == (48, 32)
    assert np.array_equal(loaded[q8_name].numpy(), dequantize_q8(q8, 48 * 32).reshape(48, 32))
    assert np.array_equal(loaded[q4_name].numpy(), dequantize_q4(q4, 32 * 32).reshape(32, 32))
    assert loaded.source_dtypes[q8_name] == "q8" and loaded.source_dtypes[q4_name] == "q4"


def test_k_quants_are_refused_not_misread(tmp_path):
    tensors = {name: t.numpy() for name, t in random_tensors(LLAMA).items()}
    name = "model.layers.0.mlp.down_proj.weight"  # [32, 48]: 1536 values = 6 Q4_K super-blocks
    tensors.pop(name)
    with AprWriter(tmp_path / "k.apr", LLAMA.to_metadata()) as writer:
        for n, array in tensors.items():
            writer.add(n, array)
        writer.add(name, bytes(6 * 144), dtype="q4_k", shape=(32, 48))
    with pytest.raises(UnsupportedFeature, match="q4_k"):
        load_init_tensors(tmp_path / "k.apr")


def test_integer_weights_are_refused(tmp_path):
    tensors = random_tensors(LLAMA)
    tensors["model.norm.weight"] = torch.ones(32, dtype=torch.int32)
    with pytest.raises(ShapeMismatch, match=r"model\.norm\.weight is i32, expected a float or q4/q8 dtype"):
        load_init_tensors(write(tmp_path / "m.apr", LLAMA, tensors))


def test_zstd_file_gives_writable_copies(tmp_path):
    tensors = random_tensors(LLAMA, torch.bfloat16)
    save_apr(tmp_path / "z.apr", tensors, LLAMA.to_metadata(), compression="zstd")
    loaded = load_init_tensors(tmp_path / "z.apr")
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name].view(torch.int16), tensor.view(torch.int16))
    assert loaded["model.norm.weight"].untyped_storage().resizable()  # an owned copy, safe to train
