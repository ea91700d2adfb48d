"""Decoder architecture of an .apr checkpoint: `ArchitectureConfig` and `read_architecture`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .errors import AprError, CorruptMetadata, MissingConfigKey, UnsupportedArchitecture, UnsupportedFeature


@dataclass(frozen=True)
class Family:
    """What one decoder family fixes that the metadata may leave out."""

    attention_bias: bool  # q/k/v projections carry a bias unless the metadata says otherwise
    o_proj_bias: bool  # HF Llama's `attention_bias` also biases o_proj; Qwen2 never does


FAMILIES: dict[str, Family] = {
    "llama": Family(attention_bias=False, o_proj_bias=True),
    "qwen2": Family(attention_bias=True, o_proj_bias=False),
}
SUPPORTED_FAMILIES = tuple(FAMILIES)

# Where the family name may sit, most specific first. aprender writes `architecture` =
# config.json `model_type`, `hf_model_type` the same, and `model_type` "Auto" or the family.
_FAMILY_KEYS = ("architecture", "hf_model_type", "model_type")
_NOT_A_FAMILY = frozenset(("auto", ""))

# Canonical APR key -> spellings accepted only when the canonical key is absent: HF config
# names (some writers put them at the top level, aprender keeps them under `hf_config`) and the
# serde aliases of aprender's runtime metadata struct (realizar `AprMetadata`, PMAT-111).
ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("num_hidden_layers", "n_layers", "n_layer"),
    "num_heads": ("num_attention_heads", "n_heads", "n_head"),
    "num_kv_heads": ("num_key_value_heads", "n_kv_heads"),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "vocab_size": ("n_vocab",),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx", "n_positions"),
    "rope_theta": (),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
    "head_dim": (),
    "tie_word_embeddings": ("tied_embeddings",),
    "attention_bias": (),
}
_INT_KEYS = (
    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class ArchitectureConfig:
    """Shape and numerics of a Llama-style decoder (Llama, Qwen2). Field names are APR's."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool

    def __post_init__(self) -> None:
        _check_values(self, None)

    @classmethod
    def from_metadata(cls, meta: dict, path: str | os.PathLike | None = None) -> "ArchitectureConfig":
        """Build from APR metadata (canonical keys, then aliases, then the nested `hf_config`).

        Defaults exist only where they are well defined: `num_kv_heads` = `num_heads`,
        `head_dim` = `hidden_size / num_heads`, `attention_bias` = the family's (qwen2 true,
        llama false). `tie_word_embeddings` also accepts aprender's `tied_embeddings`; when no
        source says it, it is a MissingConfigKey here (`read_architecture` can decide it from
        the tensor index).

        Raises:
            UnsupportedArchitecture: the family is missing from SUPPORTED_FAMILIES (bert, t5, ...).
            MissingConfigKey: a key without a default is absent (the message names it).
            UnsupportedFeature: rope scaling, sliding-window attention, MLP biases or a
                non-SiLU activation, which the trainer's model does not implement.
            CorruptMetadata: a value of the wrong type or out of range.
        """
        family = _family(meta, path)
        lookup = _Lookup(meta, path)
        _reject_unsupported_features(lookup, path)
        hidden_size, num_heads = lookup.as_int("hidden_size"), lookup.as_int("num_heads")
        head_dim = lookup.as_int("head_dim", default=None)
        if head_dim is None:
            if hidden_size % num_heads:
                raise CorruptMetadata(
                    path, f"hidden_size {hidden_size} is not divisible by num_heads {num_heads} and head_dim is absent"
                )
            head_dim = hidden_size // num_heads
        fields = dict(
            family=family,
            hidden_size=hidden_size,
            num_layers=lookup.as_int("num_layers"),
            num_heads=num_heads,
            num_kv_heads=lookup.as_int("num_kv_heads", default=num_heads),
            head_dim=head_dim,
            intermediate_size=lookup.as_int("intermediate_size"),
            vocab_size=lookup.as_int("vocab_size"),
            max_position_embeddings=lookup.as_int("max_position_embeddings"),
            rope_theta=lookup.as_float("rope_theta"),
            rms_norm_eps=lookup.as_float("rms_norm_eps"),
            tie_word_embeddings=lookup.as_bool("tie_word_embeddings"),
            attention_bias=lookup.as_bool("attention_bias", default=FAMILIES[family].attention_bias),
        )
        try:
            return cls(**fields)
        except AprError as exc:  # re-raised with the file's path
            raise type(exc)(path, exc.problem) from None

    def to_metadata(self) -> dict[str, Any]:
        """Canonical APR metadata keys for this architecture (no aliases; spec "Metadata").

        `rope_type` is 2 for both families: HF-layout q/k weights use the rotate-half
        convention (spec: "Conventions of aprender's HF importer"). `attention_bias` is a custom
        key, written so that a round trip through metadata is lossless.
        """
        return {
            "architecture": self.family,
            "model_type": self.family,
            **{key: getattr(self, key) for key in _INT_KEYS},
            "rope_theta": self.rope_theta,
            "rope_type": 2,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
        }

    @property
    def o_proj_bias(self) -> bool:
        """Whether o_proj carries a bias (HF Llama ties it to attention_bias; Qwen2 never)."""
        return self.attention_bias and FAMILIES[self.family].o_proj_bias

    def param_count(self) -> int:
        """Number of distinct trainable parameters (a tied head counts once)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        if self.attention_bias:
            attention += q + 2 * kv + (h if self.o_proj_bias else 0)
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head


def read_architecture(path: str | os.PathLike) -> ArchitectureConfig:
    """The architecture of the .apr at `path`, from its header, metadata and index only.

    No tensor bytes are read, so an unsupported family fails before any weight is touched.
    When neither the metadata nor its `hf_config` says whether embeddings are tied, the
    tensor index decides: no `lm_head.weight` means tied (the only way the file can work),
    a present one means an untied head, used as stored.

    Raises:
        The AprError subclasses of `open_apr` and `ArchitectureConfig.from_metadata`.
    """
    from .reader import open_apr

    with open_apr(path, use_mmap=False) as f:
        return architecture_of(f.metadata, f.keys(), f.path)


def architecture_of(meta: dict, tensor_names, path: str | os.PathLike | None) -> ArchitectureConfig:
    """`from_metadata`, with the tied-embedding question settled by `tensor_names` if needed."""
    _family(meta, path)  # an encoder fails here, before anything else is looked at
    if _Lookup(meta, path).get("tie_word_embeddings") is None:
        meta = {**meta, "tie_word_embeddings": "lm_head.weight" not in set(tensor_names)}
    return ArchitectureConfig.from_metadata(meta, path)


# -- helpers ---------------------------------------------------------------------------------
def _family(meta: dict, path) -> str:
    hf_config = meta.get("hf_config") if isinstance(meta.get("hf_config"), dict) else {}
    candidates = [meta.get(k) for k in _FAMILY_KEYS] + [hf_config.get("model_type")]
    for value in candidates:
        if isinstance(value, str) and value.strip().lower() not in _NOT_A_FAMILY:
            family = value.strip().lower()
            if family not in FAMILIES:
                raise UnsupportedArchitecture(
                    path,
                    f"architecture {value!r} is not supported; supported decoder families: "
                    f"{', '.join(SUPPORTED_FAMILIES)}",
                )
            return family
    raise MissingConfigKey(
        path,
        f"metadata has no 'architecture' (nor model_type / hf_model_type); supported: {', '.join(SUPPORTED_FAMILIES)}",
    )


_REQUIRED = object()


class _Lookup:
    """Reads one architecture key: canonical, then aliases, then the same under `hf_config`."""

    def __init__(self, meta: dict, path) -> None:
        self.meta, self.path = meta, path
        hf = meta.get("hf_config")
        self.hf: dict = hf if isinstance(hf, dict) else {}

    def get(self, key: str) -> Any:
        names = (key, *ALIASES.get(key, ()))
        for source in (self.meta, self.hf):
            for name in names:
                if source.get(name) is not None:
                    return source[name]
        if key == "rope_theta":  # transformers >= 5 nests it: {"rope_parameters": {"rope_theta": ...}}
            nested = self.hf.get("rope_parameters") or self.meta.get("rope_parameters")
            if isinstance(nested, dict) and nested.get("rope_theta") is not None:
                return nested["rope_theta"]
        return None

    def _value(self, key: str, default: Any) -> Any:
        value = self.get(key)
        if value is not None:
            return value
        if default is _REQUIRED:
            raise MissingConfigKey(self.path, f"architecture key {key!r} is missing and has no default")
        return default

    def as_int(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._value(key, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CorruptMetadata(self.path, f"{key} is {value!r}, expected a positive integer")
        return value

    def as_float(self, key: str) -> float:
        value = self._value(key, _REQUIRED)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise CorruptMetadata(self.path, f"{key} is {value!r}, expected a positive number")
        return float(value)

    def as_bool(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            raise CorruptMetadata(self.path, f"{key} is {value!r}, expected true or false")
        return value




def _reject_unsupported_features(lookup: _Lookup, path) -> None:
    """Settings that change the maths of the model; building it anyway would give garbage."""
    for source in (lookup.meta, lookup.hf):
        scaling = source.get("rope_scaling") or source.get("rope_parameters")
        if isinstance(scaling, dict):
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in (None, "default"):
                raise UnsupportedFeature(path, f"rope scaling {kind!r} is not supported (only plain RoPE)")
        if source.get("use_sliding_window") is True:
            raise UnsupportedFeature(path, "sliding-window attention is not supported")
        if source.get("mlp_bias") is True:
            raise UnsupportedFeature(path, "MLP biases (mlp_bias true) are not supported")
        act = source.get("hidden_act")
        if act is not None and act != "silu":
            raise UnsupportedFeature(path, f"activation {act!r} is not supported (only silu / SwiGLU)")


def _check_values(config: ArchitectureConfig, path) -> None:
    if config.family not in FAMILIES:
        raise UnsupportedArchitecture(
            path, f"architecture {config.family!r} is not supported; supported decoder families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    for key in _INT_KEYS:
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise CorruptMetadata(path, f"{key} is {value!r}, expected a positive integer")
    for key in ("rope_theta", "rms_norm_eps"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise CorruptMetadata(path, f"{key} is {value!r}, expected a positive number")
    if config.num_heads % config.num_kv_heads:
        raise CorruptMetadata(
            path, f"num_heads {config.num_heads} is not a multiple of num_kv_heads {config.num_kv_heads}"
        )
    if config.head_dim % 2:
        raise CorruptMetadata(path, f"head_dim {config.head_dim} must be even for rotary embeddings")
