"""ArchitectureConfig / read_architecture: keys, defaults, aliases, refusals, and failing fast on encoders."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import transformers

from apr_format import SUPPORTED_FAMILIES, ArchitectureConfig, open_apr, read_architecture, save_apr
from apr_format.families import aliases
from apr_format.errors import (
    CorruptMetadata, InvalidArchitectureConfig, InvalidArgument, MissingConfigKey, UnsupportedArchitecture, UnsupportedFeature,
)
from apr_format.init_tensors import load_init_tensors
from apr_format.reader import AprFile
from apr_testing import TINY_LLAMA, TINY_QWEN2
from apr_trainer.model import DecoderLM
from apr_trainer.presets import PRESETS, load_arch_config, preset

TINY = PRESETS["tiny"]
CANONICAL = {
    "architecture": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 512, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}


def test_metadata_round_trip_uses_canonical_keys_only():
    meta = TINY.to_metadata()
    assert ArchitectureConfig.from_metadata(meta) == TINY
    assert meta["architecture"] == meta["model_type"] == "llama" and meta["rope_type"] == 2
    assert set(meta) == {
        "architecture", "model_type", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
        "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rope_type", "rms_norm_eps",
        "tie_word_embeddings", "attention_bias",
    }
    spellings = {alias for key in meta for alias in aliases(key)} - {"tied_embeddings"}
    assert not spellings & set(meta)


def test_well_defined_defaults():
    config = ArchitectureConfig.from_metadata(
        {k: v for k, v in CANONICAL.items() if k != "num_kv_heads"} | {"architecture": "qwen2"}
    )
    assert config.num_kv_heads == 4 and config.head_dim == 16
    assert config.attention_bias  # qwen2's q/k/v biases
    assert not ArchitectureConfig.from_metadata(CANONICAL).attention_bias  # llama
    assert ArchitectureConfig.from_metadata(CANONICAL | {"attention_bias": True}).o_proj_bias
    assert not ArchitectureConfig.from_metadata(CANONICAL | {"architecture": "qwen2"}).o_proj_bias
    assert ArchitectureConfig.from_metadata(CANONICAL | {"head_dim": 32}).head_dim == 32


@pytest.mark.parametrize(
    "key", ["hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings"],
)
def test_missing_key_without_default_is_named(key):
    meta = {k: v for k, v in CANONICAL.items() if k != key}
    with pytest.raises(MissingConfigKey, match=f"m.apr: architecture key '{key}' is missing and has no default"):
        ArchitectureConfig.from_metadata(meta, "m.apr")


def test_aliases_are_only_a_fallback():
    meta = {k: v for k, v in CANONICAL.items() if k not in ("num_layers", "num_heads", "tie_word_embeddings")}
    meta |= {"num_hidden_layers": 3, "num_attention_heads": 8, "tied_embeddings": False}
    config = ArchitectureConfig.from_metadata(meta)
    assert (config.num_layers, config.num_heads, config.head_dim, config.tie_word_embeddings) == (3, 8, 8, False)
    both = CANONICAL | {"num_hidden_layers": 7}
    assert ArchitectureConfig.from_metadata(both).num_layers == 2


@pytest.mark.parametrize(
    ("config_cls", "base"), [(transformers.Qwen2Config, TINY_QWEN2), (transformers.LlamaConfig, TINY_LLAMA)]
)
def test_hf_config_fallback(config_cls, base):
    """aprender keeps the source config.json under `hf_config` (transformers 5 nests rope_theta)."""
    hf_config = config_cls(**base).to_dict()
    config = ArchitectureConfig.from_metadata({"architecture": hf_config["model_type"], "hf_config": hf_config})
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads) == (64, 2, 4, 2)
    assert config.vocab_size == base["vocab_size"] and config.rope_theta == base["rope_theta"]
    assert config.tie_word_embeddings == base["tie_word_embeddings"] and config.rms_norm_eps == base["rms_norm_eps"]
    assert config.attention_bias == (hf_config["model_type"] == "qwen2")


@pytest.mark.parametrize("family", ["bert", "roberta", "t5", "gpt2", "whisper", "BertModel"])
def test_unsupported_family_names_itself_and_the_supported_list(family):
    with pytest.raises(UnsupportedArchitecture) as info:
        ArchitectureConfig.from_metadata({"architecture": family}, "enc.apr")
    assert str(info.value) == (
        f"enc.apr: architecture {family!r} is not supported; supported decoder families: llama, qwen2, mistral"
    )
    assert SUPPORTED_FAMILIES == ("llama", "qwen2", "mistral")


def test_family_from_other_keys():
    no_arch = {k: v for k, v in CANONICAL.items() if k != "architecture"}
    aprender_style = no_arch | {"hf_model_type": "qwen2", "model_type": "Auto"}
    assert ArchitectureConfig.from_metadata(aprender_style).family == "qwen2"
    assert ArchitectureConfig.from_metadata(no_arch | {"model_type": "Qwen2"}).family == "qwen2"
    with pytest.raises(UnsupportedArchitecture, match="'bert'"):
        ArchitectureConfig.from_metadata(no_arch | {"model_type": "Auto", "hf_config": {"model_type": "bert"}})
    with pytest.raises(MissingConfigKey, match="no 'architecture'"):
        ArchitectureConfig.from_metadata(no_arch | {"model_type": "Auto"})


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"hf_config": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}}, "rope scaling 'llama3'"),
        ({"hf_config": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}}, "rope scaling 'yarn'"),
        ({"hf_config": {"use_sliding_window": True}}, "sliding-window"),
        ({"hf_config": {"mlp_bias": True}}, "mlp_bias"),
        ({"hf_config": {"hidden_act": "gelu"}}, "activation 'gelu'"),
    ],
)
def test_settings_the_model_cannot_compute_are_refused(extra, problem):
    with pytest.raises(UnsupportedFeature, match=problem):
        ArchitectureConfig.from_metadata(CANONICAL | extra)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"num_kv_heads": 3}, "num_heads 4 is not a multiple of num_kv_heads 3"),
        ({"hidden_size": -64}, "hidden_size is -64, expected a positive integer"),
        ({"num_layers": 2.5}, "num_layers is 2.5, expected a positive integer"),
        ({"vocab_size": "512"}, "vocab_size is '512', expected a positive integer"),
        ({"rope_theta": 0}, "rope_theta is 0, expected a positive number"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings is 'yes', expected true or false"),
        ({"hidden_size": 66}, "hidden_size 66 is not divisible by num_heads 4"),
        ({"head_dim": 15}, "head_dim 15 must be even"),
    ],
)
def test_bad_values_are_corrupt_metadata_with_the_path(change, problem):
    with pytest.raises(CorruptMetadata) as info:
        ArchitectureConfig.from_metadata(CANONICAL | change, "m.apr")
    assert str(info.value).startswith("m.apr: ") and problem in str(info.value)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.hidden_size = 128  # type: ignore[misc]


def test_read_architecture_settles_tying_from_the_index(tmp_path):
    meta = {k: v for k, v in TINY.to_metadata().items() if k != "tie_word_embeddings"}
    save_apr(tmp_path / "tied.apr", {"model.embed_tokens.weight": np.zeros((512, 64), np.float32)}, meta)
    save_apr(tmp_path / "untied.apr", {"lm_head.weight": np.zeros((512, 64), np.float32)}, meta)
    assert read_architecture(tmp_path / "tied.apr").tie_word_embeddings is True
    assert read_architecture(tmp_path / "untied.apr").tie_word_embeddings is False
    with pytest.raises(MissingConfigKey, match="tie_word_embeddings"):
        ArchitectureConfig.from_metadata(meta)


def test_presets_and_json_architecture_files(tmp_path):
    assert preset("tiny") is TINY and preset("llama-370m").vocab_size == 50257
    with pytest.raises(InvalidArgument, match="^--arch: unknown architecture preset 'gpt5'; known: llama-370m, tiny$") as exc:
        preset("gpt5")
    assert exc.value.flag == "--arch" and exc.value.path is None
    (tmp_path / "arch.json").write_text(json.dumps(TINY.to_metadata()))
    assert load_arch_config(tmp_path / "arch.json") == TINY
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(InvalidArchitectureConfig, match="bad.json: holds a JSON list, expected an object"):
        load_arch_config(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text(json.dumps({**TINY.to_metadata(), "num_layers": -1}))
    with pytest.raises(InvalidArchitectureConfig, match="neg.json: num_layers is -1, expected a positive integer"):
        load_arch_config(tmp_path / "neg.json")


@pytest.fixture
def bert_with_garbage_tensors(tmp_path):
    """An .apr that says `bert`, whose tensor bytes are all 0xFF (NaN floats, not a model)."""
    path = tmp_path / "bert.apr"
    tensors = {
        "bert.embeddings.word_embeddings.weight": np.zeros((300, 64), np.float32),
        "bert.encoder.layer.0.attention.self.query.weight": np.zeros((64, 64), np.float32),
    }
    meta = {"architecture": "bert", "hidden_size": 64, "num_layers": 1, "num_heads": 4, "vocab_size": 300}
    save_apr(path, tensors, meta)
    with open_apr(path) as f:
        start, end = f.header.data_offset, f.file_size - 4
    data = bytearray(path.read_bytes())
    data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))
    return path


def test_encoder_fails_fast_before_any_tensor_is_read_or_model_built(bert_with_garbage_tensors, monkeypatch):
    """FALSIFY-007: an encoder .apr is refused from metadata alone: no tensor byte read, no model built."""
    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data was read")

    for method in ("raw", "stored", "torch", "to_float32", "__getitem__"):
        monkeypatch.setattr(AprFile, method, forbidden)
    monkeypatch.setattr(DecoderLM, "__init__", forbidden)
    expected = (
        f"{bert_with_garbage_tensors}: architecture 'bert' is not supported; supported decoder families: llama, qwen2, mistral"
    )
    for attempt in (read_architecture, load_init_tensors, DecoderLM.from_apr):
        with pytest.raises(UnsupportedArchitecture) as info:
            attempt(bert_with_garbage_tensors)
        assert str(info.value) == expected


def test_importing_apr_format_does_not_import_torch():
    code = "import sys, apr_format; from apr_format import architecture, init_tensors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_param_count_matches_published_qwen2_5_0_5b():
    """Qwen2.5-0.5B's model card says 0.49B; transformers counts 494,032,768 parameters."""
    qwen = ArchitectureConfig(
        family="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
    )
    assert qwen.param_count() == 494_032_768
