"""Decoder architecture of an .apr checkpoint: `ArchitectureConfig` and `read_architecture`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .errors import AprError, CorruptMetadata, MissingConfigKey, UnsupportedFeature
from .families import (
    FAMILIES, SUPPORTED_FAMILIES, aliases, attention_bias_setting, get_family, parameter_count, tensor_shapes,
)


# Where the family name may sit, most specific first. aprender writes `architecture` =
# config.json `model_type`, `hf_model_type` the same, and `model_type` "Auto" or the family.
_FAMILY_KEYS = ("architecture", "hf_model_type", "model_type")
_NOT_A_FAMILY = frozenset(("auto", ""))

_INT_KEYS = (
    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
    "max_position_embeddings",
)


@dataclass(frozen=True)
class ArchitectureConfig:
    """Shape and numerics of a Llama-style decoder (a family of `families.FAMILIES`). Field names are APR's.

    `sliding_window` (families that read it, e.g. mistral) limits attention to that many
    previous positions; None means full causal attention.
    """

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
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        _check_values(self, None)

    @classmethod
    def from_metadata(cls, meta: dict, path: str | os.PathLike | None = None) -> "ArchitectureConfig":
        """Build from APR metadata (canonical keys, then aliases, then the nested `hf_config`).

        Defaults exist only where they are well defined: `num_kv_heads` = `num_heads`,
        `head_dim` = `hidden_size / num_heads`, `attention_bias` = the family's (qwen2 true,
        llama and mistral false; the HF config's `attention_bias` counts for llama only, as in
        transformers). `tie_word_embeddings` also accepts aprender's `tied_embeddings`; when no
        source says it, it is a MissingConfigKey here (`read_architecture` can decide it from
        the tensor index).

        Raises:
            UnsupportedArchitecture: the family is missing from SUPPORTED_FAMILIES (bert, t5, ...).
            MissingConfigKey: a key without a default is absent (the message names it).
            UnsupportedFeature: rope scaling, Qwen2's `use_sliding_window`, MLP biases or a
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
            attention_bias=lookup.checked_bool(
                "attention_bias", attention_bias_setting(meta, FAMILIES[family]), FAMILIES[family].attention_bias
            ),
            sliding_window=lookup.as_int("sliding_window", default=None) if FAMILIES[family].sliding_window else None,
        )
        try:
            return cls(**fields)
        except AprError as exc:  # re-raised with the file's path
            raise type(exc)(path, exc.problem) from None

    def to_metadata(self) -> dict[str, Any]:
        """Canonical APR metadata keys for this architecture (no aliases; spec "Metadata").

        `rope_type` is 2 for every family: HF-layout q/k weights use the rotate-half
        convention (spec: "Conventions of aprender's HF importer"). `attention_bias` and
        `sliding_window` are custom keys, written so that a round trip through metadata is lossless.
        """
        window = {} if self.sliding_window is None else {"sliding_window": self.sliding_window}
        return {
            "architecture": self.family,
            "model_type": self.family,
            **{key: getattr(self, key) for key in _INT_KEYS},
            "rope_theta": self.rope_theta,
            "rope_type": 2,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            **window,
        }

    @property
    def o_proj_bias(self) -> bool:
        """Whether o_proj carries a bias (HF Llama ties it to attention_bias; Qwen2 never)."""
        return self.attention_bias and FAMILIES[self.family].o_proj_bias

    def dimensions(self) -> dict[str, int]:
        """The named dimensions of the family table's shape templates."""
        return {
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size, "num_layers": self.num_layers,
            "q_dim": self.num_heads * self.head_dim, "kv_dim": self.num_kv_heads * self.head_dim,
        }

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of this model, HF name -> shape, in model order (no lm_head when tied)."""
        return tensor_shapes(
            FAMILIES[self.family], self.dimensions(), attention_bias=self.attention_bias,
            head=not self.tie_word_embeddings,
        )

    def param_count(self) -> int:
        """Number of distinct trainable parameters (a tied head counts once)."""
        return parameter_count(
            FAMILIES[self.family], self.dimensions(), attention_bias=self.attention_bias,
            head=not self.tie_word_embeddings,
        )

    def check_sequence_length(self, seq_len: int, flag: str | None = None) -> None:
        """Refuse sequences longer than the sliding window: the model implements plain causal attention.

        Raises:
            UnsupportedFeature: `seq_len` exceeds `sliding_window`.
        """
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise UnsupportedFeature(
                None, f"sequence length {seq_len} exceeds {self.family}'s sliding_window {self.sliding_window}; "
                "sliding-window attention is not implemented (use a length <= the window)", flag=flag,
            )


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
            if value.strip().lower() not in FAMILIES:
                get_family(value, path)  # raises UnsupportedArchitecture naming the supported ones
            return value.strip().lower()
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
        names = (key, *aliases(key))
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
        return self.checked_bool(key, self._value(key, default), default)

    def checked_bool(self, key: str, value: Any, default: bool) -> bool:
        """`value` (found by the caller), or `default` when None; anything but a bool is corrupt."""
        value = default if value is None else value
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
    get_family(config.family, path)
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
    window = config.sliding_window
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        raise CorruptMetadata(path, f"sliding_window is {window!r}, expected a positive integer")
    if config.head_dim % 2:
        raise CorruptMetadata(path, f"head_dim {config.head_dim} must be even for rotary embeddings")
