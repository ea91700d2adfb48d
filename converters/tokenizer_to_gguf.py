"""HF tokenizer.json (+ tokenizer_config.json) -> GGUF `tokenizer.ggml.*` values, as llama.cpp's converter writes them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apr_format.errors import UnsupportedFeature
from apr_format.families import GGUF_TOKEN_ID_KEYS

from .gguf_tokenizer import BYTE_LEVEL_PRE, CONTROL, NORMAL, UNUSED, USER_DEFINED, BytePre
from .metadata import token_text

_GPT2_DEFAULT_PRE = "default"  # llama.cpp's name for GPT-2's own split (what an unknown split falls back to)


@dataclass
class GgufVocab:
    """Typed tokenizer.ggml.* values (key without the prefix -> value) and what could not be carried."""

    model: str
    values: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def gguf_vocab(
    files: Mapping[str, str], config: Mapping[str, Any], vocab_size: int, chat_template: str | None, path: str
) -> GgufVocab:
    """The GGUF tokenizer of a byte-level BPE tokenizer.json (GPT-2, SmolLM, Qwen2, Llama 3 style).

    Tokens are padded to `vocab_size` with `[PAD{i}]` (type UNUSED) as llama.cpp pads them;
    added special tokens are CONTROL, other added tokens USER_DEFINED. `config` is the model's
    config.json (bos/eos/pad ids), used where tokenizer_config.json names no token.

    Raises:
        UnsupportedFeature: not a byte-level BPE tokenizer, or more tokens than `vocab_size`.
    """
    tokenizer = json.loads(files["tokenizer.json"])
    tok_config = json.loads(files.get("tokenizer_config.json") or "{}")
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _is_byte_level(tokenizer.get("decoder")):
        raise UnsupportedFeature(
            path, f"tokenizer.json is a {model.get('type')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''}"
            "; GGUF export carries byte-level BPE tokenizers only (GPT-2, SmolLM, Qwen2, Llama 3 style)",
        )
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {entry["id"]: entry for entry in tokenizer.get("added_tokens") or []}
    by_id.update({i: entry["content"] for i, entry in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise UnsupportedFeature(path, f"tokenizer has token id {max(by_id)}, beyond the model's {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    vocab = GgufVocab(model="gpt2")
    vocab.values["pre"] = _pre_name(tokenizer, vocab.warnings)
    vocab.values["tokens"] = tokens
    vocab.values["token_type"] = types
    vocab.values["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    lookup = {t: i for i, t in by_id.items()}
    for gguf_key, hf_key in GGUF_TOKEN_ID_KEYS.items():  # tokenizer_config.json first, as llama.cpp's SpecialVocab
        token_id = lookup.get(token_text(tok_config.get(hf_key.removesuffix("_id"))))
        if token_id is None:
            token_id = config.get(hf_key)
            if isinstance(token_id, list) and token_id:  # Llama 3 lists several eos ids; GGUF holds one
                token_id = token_id[0]
        if isinstance(token_id, int) and not isinstance(token_id, bool):
            if 0 <= token_id < vocab_size:
                vocab.values[gguf_key] = token_id
            else:
                vocab.warnings.append(f"{hf_key} {token_id} is outside the {vocab_size} tokens: left out")
    for key in ("add_bos_token", "add_eos_token"):
        if isinstance(tok_config.get(key), bool):
            vocab.values[key] = tok_config[key]
    if chat_template:
        vocab.values["chat_template"] = chat_template
    return vocab


def _is_byte_level(decoder: Any) -> bool:
    return isinstance(decoder, Mapping) and decoder.get("type") == "ByteLevel"


def _pre_name(tokenizer: Mapping[str, Any], warnings: list[str]) -> str:
    """The tokenizer.ggml.pre name whose BYTE_LEVEL_PRE entry describes this tokenizer.json's split
    (the table the GGUF import reads, looked up backwards)."""
    found = _byte_pre(tokenizer)
    for name, pre in BYTE_LEVEL_PRE.items():
        if pre == found:
            return name
    warnings.append(
        "the tokenizer's pre-tokenization is not in our table; tokenizer.ggml.pre is 'default' "
        "(GPT-2's split), so llama.cpp may split text differently"
    )
    return _GPT2_DEFAULT_PRE


def _byte_pre(tokenizer: Mapping[str, Any]) -> BytePre | None:
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    normalizer = tokenizer.get("normalizer") or {}
    nfc = normalizer.get("type") == "NFC"
    if normalizer and not nfc:
        return None
    digits, split = False, None
    for step in steps[:-1]:
        if step.get("type") == "Digits" and step.get("individual_digits") and not digits and split is None:
            digits = True
        elif step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert") and split is None:
            split = (step.get("pattern") or {}).get("Regex")
        else:
            return None
    last = steps[-1] if steps else {}
    if last.get("type") != "ByteLevel" or last.get("use_regex", True) != (split is None):
        return None
    return BytePre(split=split, digits=digits, nfc=nfc)

