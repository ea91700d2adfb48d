"""GGUF tokenizer metadata (tokenizer.ggml.*) -> HF tokenizer.json and tokenizer_config.json text."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from apr_format.errors import CorruptSource

# GGUF token types (gguf-py constants.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The splits llama.cpp applies before byte-level BPE (src/llama-vocab.cpp, by tokenizer.ggml.pre),
# spelled as the HF tokenizer.json of the same model spells them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class BytePre:
    """Pre-tokenization of a byte-level BPE vocabulary."""

    split: str | None = None  # a Split(isolated) regex before ByteLevel; None = GPT-2's own regex
    digits: bool = False  # every digit a piece of its own first (StarCoder, SmolLM)
    nfc: bool = False  # NFC-normalize the text first (Qwen2)


BYTE_LEVEL_PRE: dict[str, BytePre] = {
    "gpt2": BytePre(),
    "default": BytePre(),
    "smollm": BytePre(digits=True),
    "starcoder": BytePre(digits=True),
    "refact": BytePre(digits=True),
    "qwen2": BytePre(split=_QWEN2_SPLIT, nfc=True),
    "deepseek-r1-qwen": BytePre(split=_QWEN2_SPLIT, nfc=True),
    "llama-bpe": BytePre(split=_LLAMA3_SPLIT),
    "llama3": BytePre(split=_LLAMA3_SPLIT),
    "llama-v3": BytePre(split=_LLAMA3_SPLIT),
    "smaug-bpe": BytePre(split=_LLAMA3_SPLIT),
    "dbrx": BytePre(split=_LLAMA3_SPLIT),
}
# llama.cpp's defaults when tokenizer.ggml.add_bos_token is absent, per tokenizer.ggml.model.
ADD_BOS_DEFAULT: dict[str, bool] = {"gpt2": False, "llama": True}
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


@dataclass(frozen=True)
class TokenizerFiles:
    """The rebuilt HF files (name -> text) and what could not be rebuilt faithfully."""

    files: dict[str, str]
    model: str | None
    vocab_size: int
    warnings: tuple[str, ...] = ()


def tokenizer_files(
    meta: Mapping[str, Any], path: str | os.PathLike, *, model_max_length: int | None = None
) -> TokenizerFiles:
    """Rebuild tokenizer.json / tokenizer_config.json from GGUF `meta` (key -> Python value).

    A carried `tokenizer.huggingface.json` is used verbatim. Byte-level ("gpt2") and
    sentencepiece-BPE ("llama") vocabularies are rebuilt; anything else yields no files and
    a warning (the weights still convert).

    Raises:
        CorruptSource: token lists of the wrong type or length, special ids out of range.
    """
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return TokenizerFiles({}, None, 0, ("the GGUF has no tokenizer (tokenizer.ggml.model absent)",))
    tokens = _tokens(meta, path)
    warnings: list[str] = []
    config = _tokenizer_config(meta, tokens, model, model_max_length)
    carried = meta.get("tokenizer.huggingface.json")
    if isinstance(carried, str) and carried:
        tokenizer_json = carried
    elif model == "gpt2":
        tokenizer_json = _byte_level_json(meta, tokens, config, warnings, path)
    elif model == "llama":
        tokenizer_json = _sentencepiece_json(meta, tokens, config, path)
    else:
        warnings.append(f"tokenizer.ggml.model {model!r} is not rebuilt (supported: gpt2, llama); no tokenizer carried")
        return TokenizerFiles({}, model, len(tokens), tuple(warnings))
    files = {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
    }
    return TokenizerFiles(files, model, len(tokens), tuple(warnings))


# -- validation --------------------------------------------------------------------------------
def _tokens(meta: Mapping[str, Any], path) -> list[str]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CorruptSource(path, "tokenizer.ggml.tokens is missing or not a list of strings")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        values = meta.get(key)
        if values is not None and (not isinstance(values, list) or len(values) != len(tokens)):
            count = len(values) if isinstance(values, list) else type(values).__name__
            raise CorruptSource(path, f"{key} has {count} entries for {len(tokens)} tokens")
    for key in _SPECIAL_IDS.values():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not (isinstance(token_id, int) and 0 <= token_id < len(tokens)):
            raise CorruptSource(path, f"tokenizer.ggml.{key} is {token_id!r}, outside the {len(tokens)} tokens")
    return tokens


def _types(meta: Mapping[str, Any], tokens: list[str]) -> list[int]:
    return list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))


def _tokenizer_config(meta: Mapping[str, Any], tokens: list[str], model: str, model_max_length: int | None) -> dict:
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in _SPECIAL_IDS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            config[name] = tokens[token_id]
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", ADD_BOS_DEFAULT.get(model, False)))
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    config["clean_up_tokenization_spaces"] = False
    if model_max_length:
        config["model_max_length"] = model_max_length
    if isinstance(meta.get("tokenizer.chat_template"), str):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# -- builders ----------------------------------------------------------------------------------
def _byte_level_json(meta: Mapping[str, Any], tokens: list[str], config: dict, warnings: list[str], path) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pre_name = meta.get("tokenizer.ggml.pre", "gpt2")
    pre = BYTE_LEVEL_PRE.get(pre_name)
    if pre is None:
        warnings.append(
            f"tokenizer.ggml.pre {pre_name!r} is not in our table; using GPT-2's split (tokenization may differ)"
        )
        pre = BYTE_LEVEL_PRE["gpt2"]
    vocab = _vocab(tokens, warnings)
    merges = _merges(meta, vocab, path)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    steps = [pre_tokenizers.Digits(individual_digits=True)] if pre.digits else []
    if pre.split is not None:
        steps.append(pre_tokenizers.Split(Regex(pre.split), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=pre.split is None))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = _post_processor(config, vocab) or processors.ByteLevel(trim_offsets=False)
    _add_special(tok, tokens, _types(meta, tokens), meta)
    return tok.to_str()


def _sentencepiece_json(meta: Mapping[str, Any], tokens: list[str], config: dict, path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    types = _types(meta, tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CorruptSource(path, "a sentencepiece ('llama') vocabulary needs tokenizer.ggml.scores")
    vocab = _vocab(tokens, [])
    unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
    merges = _merges_from_scores(tokens, scores, types)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    processor = _post_processor(config, vocab)
    if processor is not None:
        tok.post_processor = processor
    _add_special(tok, tokens, types, meta)
    return tok.to_str()


def _merges(meta: Mapping[str, Any], vocab: dict[str, int], path) -> list[tuple[str, str]]:
    """tokenizer.ggml.merges as pairs; each side and their concatenation must be tokens."""
    merges = meta.get("tokenizer.ggml.merges") or []
    if not isinstance(merges, list):
        raise CorruptSource(path, "tokenizer.ggml.merges is not a list of strings")
    pairs = []
    for index, merge in enumerate(merges):
        pair = tuple(merge.split(" ", 1)) if isinstance(merge, str) else ()
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or pair[0] + pair[1] not in vocab:
            raise CorruptSource(path, f"tokenizer.ggml.merges[{index}] {merge!r} does not join two tokens into a token")
        pairs.append(pair)
    return pairs


def _vocab(tokens: list[str], warnings: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if len(vocab) != len(tokens):
        warnings.append(f"{len(tokens) - len(vocab)} duplicate token strings; the first id of each is kept")
    return vocab


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges a sentencepiece BPE vocabulary implies: a pair of pieces whose concatenation is a
    piece, ranked by that piece's score (the ordering transformers' generate_merges uses)."""
    normal = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL}
    found: list[tuple[str, str, float]] = []
    for merged, index in normal.items():
        local = [
            (merged[:cut], merged[cut:], scores[index])
            for cut in range(1, len(merged))
            if merged[:cut] in normal and merged[cut:] in normal
        ]
        found.extend(sorted(local, key=lambda m: (normal[m[0]], normal[m[1]])))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _post_processor(config: dict, vocab: dict[str, int]):
    """BOS/EOS insertion as the GGUF asks (tokenizer.ggml.add_bos_token / add_eos_token)."""
    from tokenizers import processors

    bos = config.get("bos_token") if config["add_bos_token"] else None
    eos = config.get("eos_token") if config["add_eos_token"] else None
    if bos is None and eos is None:
        return None
    single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
    pair = single + " " + " ".join(p for p in (bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
    specials = [(t, vocab[t]) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _add_special(tok, tokens: list[str], types: list[int], meta: Mapping[str, Any]) -> None:
    """Control/unknown tokens (and the special ids) become special added tokens, user-defined
    ones plain added tokens, so they are matched whole as llama.cpp matches them."""
    from tokenizers import AddedToken

    special_ids = {meta.get(f"tokenizer.ggml.{key}") for key in _SPECIAL_IDS.values()} - {None}
    special = [
        AddedToken(token, special=True, normalized=False)
        for index, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, UNKNOWN) or index in special_ids
    ]
    user = [
        AddedToken(token, special=False, normalized=False)
        for index, (token, kind) in enumerate(zip(tokens, types))
        if kind == USER_DEFINED and index not in special_ids
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
