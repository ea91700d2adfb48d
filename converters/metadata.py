"""APR metadata from an HF-style config and carried tokenizer files, and the reverse (config.json from metadata)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from apr_format.constants import Flag
from apr_format.families import family_of, hf_keys, is_tied, map_config

from .hf_source import json_object

# Custom metadata keys this package writes (spec: "Any other key is a custom key").
HF_CONFIG = "hf_config"  # the original config.json object
HF_CONFIG_TEXT = "hf_config_text"  # its exact text, only when json.dumps would not reproduce it
HF_FILES = "hf_files"  # carried file name -> text (tokenizer.json, generation_config.json, ...)
HF_INDEX = "hf_index"  # the source's shard index (metadata + weight_map), to restore its split
SOURCE_METADATA = "source_metadata"  # the source safetensors __metadata__ (aprender's key)
TIED = "tied_embeddings"  # aprender's spelling; readers also accept tie_word_embeddings
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_IM_TOKENS = {"im_start_token": "<|im_start|>", "im_end_token": "<|im_end|>"}


def apr_metadata(
    hf_config: Mapping[str, Any] | None,
    *,
    source: str,
    original_format: str,
    extra_files: Mapping[str, str],
    param_count: int,
    total_size: int,
    config_text: str | None = None,
) -> tuple[dict[str, Any], int]:
    """The APR metadata dict and extra header flags (HAS_VOCAB) for a model.

    `hf_config` is a config.json-style dict (None for a bare weights file); `config_text` its
    original text, kept verbatim when re-serialising would not reproduce it; `extra_files`
    the carried tokenizer / generation files by name.
    """
    meta: dict[str, Any] = {}
    config = dict(hf_config) if hf_config is not None else None
    model_type = config.get("model_type") if config else None
    family = family_of(model_type)
    if isinstance(model_type, str):
        meta["model_type"] = family.name if family else model_type
        meta["architecture"] = model_type
    meta["name"] = _name(source)
    meta["source"] = source
    meta["original_format"] = original_format
    meta["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    meta["param_count"] = int(param_count)
    meta["total_size"] = int(total_size)
    if config is not None:
        arch = map_config(config, family)
        if family is not None:
            for key, value in family.defaults.items():
                arch.setdefault(key, value)
            arch.setdefault("num_kv_heads", arch.get("num_heads"))
            arch["rope_type"] = family.rope_type
        meta.update({k: v for k, v in arch.items() if v is not None})
        if isinstance(model_type, str):
            meta["hf_model_type"] = model_type
        if family is not None:
            meta[TIED] = is_tied(config, family)
        meta[HF_CONFIG] = config
        if config_text is not None and config_text != config_json(config):
            meta[HF_CONFIG_TEXT] = config_text
    flags = 0
    if extra_files:
        parsed = {name: json_object(text, os.path.join(source, name)) for name, text in extra_files.items()
                  if name.endswith(".json")}
        meta[HF_FILES] = dict(sorted(extra_files.items()))
        meta.update(_chat_keys(extra_files, parsed))
        tokenizer = _tokenizer_keys(parsed, config or {})
        meta.update(tokenizer)
        if tokenizer or "tokenizer.json" in extra_files:
            flags |= Flag.HAS_VOCAB
    return meta, int(flags)


def config_json(config: Mapping[str, Any]) -> str:
    """config.json text the way transformers writes it (`PretrainedConfig.to_json_file`)."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def hf_config_text(meta: Mapping[str, Any]) -> str | None:
    """The config.json text to export: the stored original, or rebuilt from metadata."""
    text = meta.get(HF_CONFIG_TEXT)
    if isinstance(text, str):
        return text
    config = meta.get(HF_CONFIG)
    if isinstance(config, Mapping):
        return config_json(config)
    rebuilt = rebuild_config(meta)
    return config_json(rebuilt) if rebuilt else None


def rebuild_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A config.json dict from canonical metadata keys (for files without hf_config)."""
    model_type = meta.get("hf_model_type") or meta.get("architecture")
    if not isinstance(model_type, str):
        return {}
    family = family_of(model_type)
    config: dict[str, Any] = {"model_type": model_type}
    if family is not None:
        config["architectures"] = [family.hf_architecture]
        config["tie_word_embeddings"] = is_tied(meta, family)
        config["hidden_act"] = "silu"
    for apr_key, hf_key in hf_keys(family).items():
        if meta.get(apr_key) is not None:
            config[hf_key] = meta[apr_key]
    return config


def _name(source: str) -> str:
    base = os.path.basename(os.path.normpath(source))
    stem, ext = os.path.splitext(base)
    return stem if ext in (".safetensors", ".gguf") else base


def _chat_keys(files: Mapping[str, str], parsed: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    tok_config = parsed.get("tokenizer_config.json", {})
    out: dict[str, Any] = {}
    template = files.get("chat_template.jinja") or tok_config.get("chat_template")
    if isinstance(template, str) and template:
        out["chat_template"] = template
    special = {}
    for key in _SPECIAL_TOKENS:
        token = token_text(tok_config.get(key))
        if token is None:
            token = token_text(parsed.get("special_tokens_map.json", {}).get(key))
        if token is not None:
            special[key] = token
    added = _added_tokens(parsed.get("tokenizer.json", {}))
    for key, token in _IM_TOKENS.items():
        if token in added:
            special[key] = token
    if special:
        out["special_tokens"] = special
    return out


def _tokenizer_keys(parsed: Mapping[str, dict[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """aprender's tokenizer.* keys for a BPE tokenizer.json (spec: "Tokenizer")."""
    tokenizer = parsed.get("tokenizer.json", {})
    model = tokenizer.get("model")
    if not isinstance(model, Mapping) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), Mapping):
        return {}
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items() if isinstance(i, int) and i >= 0}
    by_id.update({i: t for t, i in _added_tokens(tokenizer).items() if i >= 0})
    size = max(by_id) + 1 if by_id else 0
    vocabulary = ["<unk>"] * size
    for i, token in by_id.items():
        vocabulary[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    out: dict[str, Any] = {
        "tokenizer.model_type": "bpe",
        "tokenizer.vocab_size": size,
        "tokenizer.vocabulary": vocabulary,
        "tokenizer.merges": merges,
    }
    tok_config = parsed.get("tokenizer_config.json", {})
    lookup = {t: i for i, t in by_id.items()}
    for key in ("bos", "eos"):
        token_id = config.get(f"{key}_token_id")
        if isinstance(token_id, list) and token_id:  # Llama 3 lists several eos ids
            token_id = token_id[0]
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            token_id = lookup.get(token_text(tok_config.get(f"{key}_token")))
        if token_id is not None:
            out[f"tokenizer.{key}_token_id"] = token_id
    return out


def _added_tokens(tokenizer: Mapping[str, Any]) -> dict[str, int]:
    out = {}
    for entry in tokenizer.get("added_tokens") or []:
        if isinstance(entry, Mapping) and isinstance(entry.get("content"), str) and isinstance(entry.get("id"), int):
            out[entry["content"]] = entry["id"]
    return out


def token_text(value: Any) -> str | None:
    """The text of a special token given as a string or as {"content": ...} (tokenizer_config.json)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None
