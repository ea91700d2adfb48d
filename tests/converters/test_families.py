"""One family table for converters, loader and trainer: Mistral end to end, Llama with attention biases."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from apr_format import ArchitectureConfig, read_architecture
from apr_format.errors import UnsupportedFeature
from apr_format.families import FAMILIES, expected_tensors
from apr_format.init_tensors import expected_parameter_shapes, load_init_tensors
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_testing import assert_same_folder, build_hf_checkpoint, run_apr, run_apr_json
from apr_trainer.model import DecoderLM

IDS = torch.tensor([[1, 5, 17, 42, 99, 3, 250, 7, 8, 11, 300, 2]])


def _same_logits_as_transformers(folder: Path, apr: Path) -> None:
    """The trainer's model on the .apr gives transformers' logits on the HF folder."""
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = DecoderLM.from_apr(apr).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), reference(IDS).logits, rtol=1e-4, atol=1e-4)


def test_every_table_entry_names_a_transformers_class():
    for family in FAMILIES.values():
        assert getattr(transformers, family.hf_architecture).config_class.model_type == family.name


def test_mistral_converts_inspects_exports_and_loads(tmp_path):
    source = build_hf_checkpoint(tmp_path / "mistral", "mistral")
    apr, out = tmp_path / "m.apr", tmp_path / "out"
    report = json.loads(run_apr("convert", source, "-o", apr, "--json", check=True).stdout)
    assert report["family"] == "mistral" and report["extra_tensors"] == []
    info = run_apr_json("inspect", apr)
    assert info["architecture"] == "mistral"
    assert info["metadata"]["sliding_window"] == 128
    run_apr("export", apr, "-o", out, check=True)
    assert_same_folder(source, out)  # byte-identical round trip
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(exported).__name__ == "MistralForCausalLM"
    config = read_architecture(apr)
    assert (config.family, config.sliding_window, config.attention_bias) == ("mistral", 128, False)
    assert list(load_init_tensors(apr)) == list(expected_parameter_shapes(config))
    _same_logits_as_transformers(out, apr)


def test_mistral_window_shorter_than_the_sequence_is_refused(tmp_path):
    source = build_hf_checkpoint(tmp_path / "mistral", "mistral", sliding_window=8)
    convert_hf_to_apr(source, tmp_path / "m.apr")
    model = DecoderLM.from_apr(tmp_path / "m.apr")
    with pytest.raises(UnsupportedFeature) as exc:
        model(IDS)
    assert str(exc.value) == (
        "sequence length 12 exceeds mistral's sliding_window 8; sliding-window attention is not implemented "
        "(use a length <= the window)"
    )
    model(IDS[:, :8])  # within the window the attention is plain causal: allowed


def test_null_sliding_window_is_plain_causal_attention():
    meta = {"architecture": "mistral", "hf_config": {**json.loads(transformers.MistralConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=50,
        sliding_window=None).to_json_string())}}
    config = ArchitectureConfig.from_metadata(meta)
    assert config.sliding_window is None
    config.check_sequence_length(10**6)


def test_llama_attention_bias_converts_with_its_biases_as_known_tensors(tmp_path):
    """HF Llama's attention_bias adds q/k/v and o_proj biases: expected by converter, loader and trainer."""
    source = build_hf_checkpoint(tmp_path / "llama", "llama", attention_bias=True)
    apr = tmp_path / "b.apr"
    report = convert_hf_to_apr(source, apr)
    assert report.family == "llama" and report.extra_tensors == []
    config = read_architecture(apr)
    assert config.attention_bias and config.o_proj_bias
    shapes = expected_parameter_shapes(config)
    assert shapes["model.layers.1.self_attn.o_proj.bias"] == (64,)
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (32,)
    _same_logits_as_transformers(source, apr)


def test_biases_the_config_denies_are_reported_as_extra(tmp_path):
    source = build_hf_checkpoint(tmp_path / "llama", "llama", attention_bias=True)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "attention_bias": False}))
    report = convert_hf_to_apr(source, tmp_path / "b.apr")
    assert len(report.extra_tensors) == 8  # q/k/v/o biases of 2 layers, kept and reported


def test_converter_and_trainer_expect_the_same_tensors():
    for name, family in FAMILIES.items():
        for bias in (False, True):
            config = ArchitectureConfig(
                family=name, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=50, max_position_embeddings=64, rope_theta=1e4,
                rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=bias,
            )
            shapes = expected_parameter_shapes(config)
            assert expected_tensors(name, config.to_metadata()) == shapes
            assert config.param_count() == sum(math.prod(shape) for shape in shapes.values())
