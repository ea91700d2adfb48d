"""Metadata built from configs and tokenizers; family tables and expected tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apr_format import Flag, open_apr
from apr_format.errors import MissingConfigKey, UnsupportedArchitecture
from apr_format.families import CONFIG_KEYS, FAMILIES, expected_tensors, map_config
from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_converters.metadata import apr_metadata, config_json, rebuild_config

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "tiny-qwen2-hf"


def test_fixture_carries_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    convert_hf_to_apr(FIXTURE, tmp_path / "t.apr")
    tok = Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    with open_apr(tmp_path / "t.apr") as apr:
        meta = apr.metadata
        assert apr.flags == Flag.LAYOUT_ROW_MAJOR | Flag.HAS_VOCAB
        assert meta["tokenizer.model_type"] == "bpe"
        assert meta["tokenizer.vocab_size"] == tok.get_vocab_size() == 400
        assert meta["tokenizer.vocabulary"] == [tok.id_to_token(i) for i in range(400)]
        merges = json.loads((FIXTURE / "tokenizer.json").read_text())["model"]["merges"]
        assert meta["tokenizer.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]
        assert meta["tokenizer.bos_token_id"] == tok.token_to_id("<|endoftext|>")
        assert meta["tokenizer.eos_token_id"] == tok.token_to_id("<|im_end|>")
        assert meta["special_tokens"] == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                          "pad_token": "<|endoftext|>", "im_start_token": "<|im_start|>",
                                          "im_end_token": "<|im_end|>"}
        assert "<|im_start|>" in meta["chat_template"]
        assert set(meta["hf_files"]) == {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
        assert meta["hf_files"]["tokenizer.json"] == (FIXTURE / "tokenizer.json").read_text()
        assert meta["vocab_size"] == 512


def test_config_text_kept_only_when_needed():
    config = {"model_type": "llama", "hidden_size": 8}
    common = dict(source="x", original_format="safetensors", extra_files={}, param_count=1, total_size=4)
    meta, _ = apr_metadata(config, config_text=config_json(config), **common)
    assert "hf_config_text" not in meta
    hand_written = '{"model_type": "llama",\n "hidden_size": 8}'
    meta, flags = apr_metadata(config, config_text=hand_written, **common)
    assert meta["hf_config_text"] == hand_written and flags == 0


def test_transformers4_and_5_rope_theta_spellings():
    assert map_config({"rope_theta": 500000})["rope_theta"] == 500000.0
    assert map_config({"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})["rope_theta"] == 1e6
    assert isinstance(map_config({"rms_norm_eps": 1})["rms_norm_eps"], float)


def test_defaults_fill_what_old_configs_omit():
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 10, "intermediate_size": 128}
    meta, _ = apr_metadata(config, source="x", original_format="safetensors", extra_files={}, param_count=0, total_size=0)
    assert meta["num_kv_heads"] == 4 and meta["rope_theta"] == 10000.0 and meta["tied_embeddings"] is False


def test_expected_tensors_from_metadata():
    arch = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "vocab_size": 300,
            "intermediate_size": 128, "tied_embeddings": True}
    qwen = expected_tensors("qwen2", arch)
    assert len(qwen) == 2 + 2 * 12 and "lm_head.weight" not in qwen
    assert qwen["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert qwen["model.layers.0.self_attn.q_proj.bias"] == (64,)
    assert expected_tensors("qwen2", arch, with_head_copy=True)["lm_head.weight"] == (300, 64)
    llama = expected_tensors("llama", {**arch, "tied_embeddings": False, "head_dim": 32})
    assert llama["lm_head.weight"] == (300, 64) and llama["model.layers.0.self_attn.q_proj.weight"] == (128, 64)
    assert not any(name.endswith(".bias") for name in llama)


def test_expected_tensors_errors():
    with pytest.raises(UnsupportedArchitecture, match="architecture 'bert' is not supported"):
        expected_tensors("bert", {})
    with pytest.raises(MissingConfigKey, match="lacks vocab_size, intermediate_size"):
        expected_tensors("llama", {"hidden_size": 8, "num_layers": 1, "num_heads": 2})


def test_rebuilt_config_uses_hf_key_names():
    config = rebuild_config({"architecture": "qwen2", "num_layers": 3, "num_heads": 2, "rope_theta": 1e6,
                             "tied_embeddings": True})
    assert config == {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True,
                      "hidden_act": "silu", "num_hidden_layers": 3, "num_attention_heads": 2, "rope_theta": 1e6}


def test_tables_are_data():
    assert set(FAMILIES) == {"qwen2", "llama", "mistral"}
    assert FAMILIES["qwen2"].attention_bias and not FAMILIES["llama"].attention_bias
    assert all(f.rope_type == 2 for f in FAMILIES.values())
    assert CONFIG_KEYS["num_hidden_layers"] == "num_layers"
