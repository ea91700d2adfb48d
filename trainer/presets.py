"""Named architectures for training without --init, as plain data, and JSON architecture files."""

from __future__ import annotations

import json
import os

from apr_format.architecture import ArchitectureConfig
from apr_format.errors import CorruptMetadata, InvalidArchitectureConfig, InvalidArgument

PRESETS: dict[str, ArchitectureConfig] = {
    # aprender's default pretraining architecture (spec: "aprender's training defaults"):
    # hidden 1024, 24 layers, 16 heads, 4 kv heads, intermediate 2816, GPT-2 vocabulary
    # 50,257, rope_theta 10000, tied embeddings, no biases. head_dim = 1024 / 16; the context
    # length and eps are Llama's usual values (the spec does not fix them).
    "llama-370m": ArchitectureConfig(
        family="llama", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=4, head_dim=64,
        intermediate_size=2816, vocab_size=50257, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
    ),
    # A seconds-fast model for tests and demos: same features (GQA, tied head), tiny shapes.
    "tiny": ArchitectureConfig(
        family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=512, max_position_embeddings=512, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False,
    ),
}
DEFAULT_PRESET = "llama-370m"


def preset(name: str) -> ArchitectureConfig:
    """The preset called `name`.

    Raises:
        InvalidArgument: unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidArgument(
            None, f"unknown architecture preset {name!r}; known: {', '.join(PRESETS)}", flag="--arch"
        ) from None


def load_arch_config(json_path: str | os.PathLike) -> ArchitectureConfig:
    """An architecture from a JSON file holding APR metadata keys (or an HF config.json).

    Same rules as `ArchitectureConfig.from_metadata`; `tie_word_embeddings` must be stated.

    Raises:
        InvalidArchitectureConfig: not a JSON object, or a value of the wrong type or range.
        Plus `from_metadata`'s other errors (MissingConfigKey, ...) and OSError.
    """
    with open(json_path, encoding="utf-8") as fh:
        try:
            data = json.load(fh)
        except ValueError as exc:
            raise InvalidArchitectureConfig(json_path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidArchitectureConfig(json_path, f"holds a JSON {type(data).__name__}, expected an object")
    try:
        return ArchitectureConfig.from_metadata({k: v for k, v in data.items() if v is not None}, json_path)
    except CorruptMetadata as exc:  # the user's file, not a checkpoint's metadata
        raise InvalidArchitectureConfig(json_path, exc.problem) from None

