"""Model-family knowledge as data: HF config keys -> APR metadata keys, and each family's tensors and shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from apr_format.errors import CorruptMetadata, MissingConfigKey, UnsupportedArchitecture

# HF config.json key -> APR metadata key (spec: "Metadata"). A dotted key is a nested lookup;
# the first key found for an APR key wins (transformers 5 moved rope_theta into rope_parameters).
CONFIG_KEYS: dict[str, str] = {
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "vocab_size": "vocab_size",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "rope_theta": "rope_theta",
    "rope_parameters.rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "head_dim": "head_dim",
    "num_local_experts": "num_experts",
    "num_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_tok",
    "moe_intermediate_size": "moe_intermediate_size",
}
FLOAT_KEYS = frozenset(("rope_theta", "rms_norm_eps"))  # the spec types these as floats
# APR key -> the plain HF key that carries it back (rebuilding a config.json without hf_config).
HF_KEYS: dict[str, str] = {}
for _hf, _apr in CONFIG_KEYS.items():
    if "." not in _hf:
        HF_KEYS.setdefault(_apr, _hf)

Shape = tuple[str, ...]  # dimension names, resolved by `dimensions()`

_DECODER_GLOBALS: dict[str, Shape] = {
    "model.embed_tokens.weight": ("vocab_size", "hidden_size"),
    "model.norm.weight": ("hidden_size",),
}
_DECODER_LAYER: dict[str, Shape] = {
    "model.layers.{i}.input_layernorm.weight": ("hidden_size",),
    "model.layers.{i}.self_attn.q_proj.weight": ("q_dim", "hidden_size"),
    "model.layers.{i}.self_attn.k_proj.weight": ("kv_dim", "hidden_size"),
    "model.layers.{i}.self_attn.v_proj.weight": ("kv_dim", "hidden_size"),
    "model.layers.{i}.self_attn.o_proj.weight": ("hidden_size", "q_dim"),
    "model.layers.{i}.post_attention_layernorm.weight": ("hidden_size",),
    "model.layers.{i}.mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "model.layers.{i}.mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "model.layers.{i}.mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
}
_QKV_BIAS: dict[str, Shape] = {
    "model.layers.{i}.self_attn.q_proj.bias": ("q_dim",),
    "model.layers.{i}.self_attn.k_proj.bias": ("kv_dim",),
    "model.layers.{i}.self_attn.v_proj.bias": ("kv_dim",),
}
_ARCH_KEYS = ("hidden_size", "num_layers", "num_heads", "vocab_size", "intermediate_size")


@dataclass(frozen=True)
class Family:
    """What one decoder family looks like on disk (HF names) and how its config reads."""

    name: str
    hf_architecture: str  # config.json "architectures" entry when rebuilding a config
    attention_bias: bool  # q/k/v projections carry biases (adds the _QKV_BIAS templates)
    gguf_qk_permuted: bool  # llama.cpp permutes q/k rows of this family in GGUF files
    tie_default: bool  # tie_word_embeddings when config.json does not say
    globals: Mapping[str, Shape] = field(default_factory=lambda: dict(_DECODER_GLOBALS))
    layer: Mapping[str, Shape] = field(default_factory=lambda: dict(_DECODER_LAYER))
    embed: str = "model.embed_tokens.weight"
    head: str = "lm_head.weight"  # absent from HF files when tied
    rope_type: int = 2  # spec: HF-layout q/k always use NEOX (split halves)
    defaults: Mapping[str, Any] = field(default_factory=dict)  # APR key -> HF class default


# Numbers in `defaults` are the transformers config classes' defaults (Qwen2Config, LlamaConfig).
FAMILIES: dict[str, Family] = {
    "qwen2": Family(
        name="qwen2", hf_architecture="Qwen2ForCausalLM", attention_bias=True, gguf_qk_permuted=False,
        tie_default=False,
        defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    ),
    "llama": Family(
        name="llama", hf_architecture="LlamaForCausalLM", attention_bias=False, gguf_qk_permuted=True,
        tie_default=False,
        defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
    ),
}


def family_of(model_type: str | None) -> Family | None:
    """The family table for an HF `model_type`, or None for families we only convert generically."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def get_family(name: str, path: str | None = None) -> Family:
    """The family named `name`.

    Raises:
        UnsupportedArchitecture: not one of FAMILIES.
    """
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedArchitecture(
            path, f"architecture {name!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return family


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """`config[key]` where a dotted key walks nested objects; None when absent or null."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def map_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The APR architecture keys that an HF config carries (CONFIG_KEYS), floats as floats."""
    out: dict[str, Any] = {}
    for hf_key, apr_key in CONFIG_KEYS.items():
        value = lookup(config, hf_key)
        if apr_key in out or value is None or isinstance(value, bool):
            continue
        if apr_key in FLOAT_KEYS and isinstance(value, (int, float)):
            out[apr_key] = float(value)
        elif isinstance(value, int) and apr_key not in FLOAT_KEYS:
            out[apr_key] = value
    return out


def is_tied(arch: Mapping[str, Any], family: Family) -> bool:
    """Whether the model ties lm_head to the embedding (either spelling of the key)."""
    for key in ("tied_embeddings", "tie_word_embeddings"):
        if isinstance(arch.get(key), bool):
            return arch[key]
    hf_config = arch.get("hf_config")
    if isinstance(hf_config, Mapping) and isinstance(hf_config.get("tie_word_embeddings"), bool):
        return hf_config["tie_word_embeddings"]
    return family.tie_default


def dimensions(arch: Mapping[str, Any], path: str | None = None) -> dict[str, int]:
    """Named dimensions used in shape templates, from APR architecture metadata.

    Raises:
        MissingConfigKey: a key without a well-defined default is absent.
    """
    missing = [k for k in _ARCH_KEYS if not isinstance(arch.get(k), int)]
    if missing:
        raise MissingConfigKey(path, f"architecture metadata lacks {', '.join(missing)}")
    bad = [f"{k} {arch[k]!r}" for k in (*_ARCH_KEYS, "num_kv_heads", "head_dim")
           if arch.get(k) is not None and (isinstance(arch[k], bool) or not isinstance(arch[k], int) or arch[k] <= 0)]
    if bad:
        raise CorruptMetadata(path, f"architecture sizes must be positive integers: {', '.join(bad)}")
    num_heads = arch["num_heads"]
    num_kv_heads = arch.get("num_kv_heads") or num_heads
    head_dim = arch.get("head_dim") or arch["hidden_size"] // num_heads
    return {
        "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
        "vocab_size": arch["vocab_size"], "num_layers": arch["num_layers"],
        "q_dim": num_heads * head_dim, "kv_dim": num_kv_heads * head_dim,
    }


def expected_tensors(
    family_name: str, arch_metadata: Mapping[str, Any], *, with_head_copy: bool = False, path: str | None = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor (HF name -> shape) a model of this family and architecture needs.

    `lm_head.weight` is included when the model is untied, or when `with_head_copy` asks for
    aprender's copy of a tied head.

    Raises:
        UnsupportedArchitecture, MissingConfigKey.
    """
    family = get_family(family_name, path)
    dims = dimensions(arch_metadata, path)
    names: dict[str, Shape] = dict(family.globals)
    if with_head_copy or not is_tied(arch_metadata, family):
        names[family.head] = ("vocab_size", "hidden_size")
    out = {name: tuple(dims[d] for d in shape) for name, shape in names.items()}
    layer = {**family.layer, **(_QKV_BIAS if family.attention_bias else {})}
    for i in range(dims["num_layers"]):
        for template, shape in layer.items():
            out[template.format(i=i)] = tuple(dims[d] for d in shape)
    return dict(sorted(out.items()))
