"""Model-family knowledge as data: the family table, tensor names and shapes, HF / GGUF key and name maps."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptMetadata, MissingConfigKey, UnsupportedArchitecture


@dataclass(frozen=True)
class Family:
    """One decoder family: what its checkpoints hold and how its configs read.

    Families differ by these entries, never by `if family == ...` branches.
    """

    name: str  # HF `model_type`, also APR `architecture`
    hf_architecture: str  # config.json "architectures" entry when rebuilding a config
    attention_bias: bool  # q/k/v carry biases when the config does not say (`attention_bias` key)
    attention_bias_key: bool  # the HF config's `attention_bias` switches the biases (LlamaConfig has it)
    o_proj_bias: bool  # `attention_bias` biases o_proj too (HF Llama: yes; Qwen2: never)
    tie_default: bool  # tie_word_embeddings when the config does not say
    defaults: Mapping[str, Any] = field(default_factory=dict)  # APR key -> the HF config class default
    config_keys: Mapping[str, str] = field(default_factory=dict)  # family-only HF key -> APR key
    sliding_window: bool = False  # the config's `sliding_window` limits attention whenever it is set
    gguf_architecture: str | None = None  # llama.cpp `general.architecture`; None: not read from GGUF
    gguf_qk_permuted: bool = False  # llama.cpp's converter permutes this family's q/k rows
    gguf_export_as: str | None = None  # GGUF export writes the model as this family (llama.cpp's convention)
    rope_type: int = 2  # spec: HF-layout q/k always use NEOX (split halves)
    embed: str = "model.embed_tokens.weight"
    head: str = "lm_head.weight"  # absent from HF files when tied


# Numbers in `defaults` are the transformers config classes' (Qwen2Config, LlamaConfig, MistralConfig).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llama", hf_architecture="LlamaForCausalLM", attention_bias=False, attention_bias_key=True,
            o_proj_bias=True, tie_default=False,
            defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
            gguf_architecture="llama", gguf_qk_permuted=True,
        ),
        Family(
            name="qwen2", hf_architecture="Qwen2ForCausalLM", attention_bias=True, attention_bias_key=False,
            o_proj_bias=False, tie_default=False,
            defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
            gguf_architecture="qwen2",
        ),
        # Llama-shaped, no biases; llama.cpp writes Mistral GGUFs as "llama" (so none is read as mistral),
        # and so does our export.
        Family(
            name="mistral", hf_architecture="MistralForCausalLM", attention_bias=False, attention_bias_key=False,
            o_proj_bias=False, tie_default=False,
            defaults={"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072},
            config_keys={"sliding_window": "sliding_window"}, sliding_window=True, gguf_export_as="llama",
        ),
    )
}
SUPPORTED_FAMILIES = tuple(FAMILIES)

# -- tensors ---------------------------------------------------------------------------------
Shape = tuple[str, ...]  # dimension names, resolved by `dimensions()`
# (HF name template, shape, when present) in model (named_parameters) order. `{i}` is the layer.
# when: None always, "qkv_bias" / "o_bias" with the biases, "head" for an untied (or copied) head.
TENSORS: tuple[tuple[str, Shape, str | None], ...] = (
    ("model.embed_tokens.weight", ("vocab_size", "hidden_size"), None),
    ("model.layers.{i}.self_attn.q_proj.weight", ("q_dim", "hidden_size"), None),
    ("model.layers.{i}.self_attn.q_proj.bias", ("q_dim",), "qkv_bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("kv_dim", "hidden_size"), None),
    ("model.layers.{i}.self_attn.k_proj.bias", ("kv_dim",), "qkv_bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("kv_dim", "hidden_size"), None),
    ("model.layers.{i}.self_attn.v_proj.bias", ("kv_dim",), "qkv_bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("hidden_size", "q_dim"), None),
    ("model.layers.{i}.self_attn.o_proj.bias", ("hidden_size",), "o_bias"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("intermediate_size", "hidden_size"), None),
    ("model.layers.{i}.mlp.up_proj.weight", ("intermediate_size", "hidden_size"), None),
    ("model.layers.{i}.mlp.down_proj.weight", ("hidden_size", "intermediate_size"), None),
    ("model.layers.{i}.input_layernorm.weight", ("hidden_size",), None),
    ("model.layers.{i}.post_attention_layernorm.weight", ("hidden_size",), None),
    ("model.norm.weight", ("hidden_size",), None),
    ("lm_head.weight", ("vocab_size", "hidden_size"), "head"),
)
TENSORS_PER_LAYER = sum(1 for name, _, when in TENSORS if "{i}" in name and when is None)

# -- HF config -------------------------------------------------------------------------------
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
# APR key -> other writers' spellings, read only when the APR key is absent: the serde aliases
# of aprender's runtime metadata struct (realizar `AprMetadata`, PMAT-111) and GPT-2 style names.
OTHER_SPELLINGS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("n_layers", "n_layer"),
    "num_heads": ("n_heads", "n_head"),
    "num_kv_heads": ("n_kv_heads",),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "vocab_size": ("n_vocab",),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx", "n_positions"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
    "tie_word_embeddings": ("tied_embeddings",),
}


def aliases(apr_key: str) -> tuple[str, ...]:
    """Spellings of `apr_key` read when it is absent: its plain HF config keys, then OTHER_SPELLINGS."""
    hf = tuple(h for h, a in CONFIG_KEYS.items() if a == apr_key and "." not in h and h != apr_key)
    return hf + OTHER_SPELLINGS.get(apr_key, ())


def hf_keys(family: Family | None = None) -> dict[str, str]:
    """APR key -> the plain HF key that carries it back (rebuilding a config.json without hf_config)."""
    out: dict[str, str] = {}
    for hf, apr in {**CONFIG_KEYS, **(family.config_keys if family else {})}.items():
        if "." not in hf:
            out.setdefault(apr, hf)
    return out


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """`config[key]` where a dotted key walks nested objects; None when absent or null."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def map_config(config: Mapping[str, Any], family: Family | None = None) -> dict[str, Any]:
    """The APR architecture keys an HF config carries (CONFIG_KEYS and the family's), floats as floats."""
    out: dict[str, Any] = {}
    for hf_key, apr_key in {**CONFIG_KEYS, **(family.config_keys if family else {})}.items():
        value = lookup(config, hf_key)
        if apr_key in out or value is None or isinstance(value, bool):
            continue
        if apr_key in FLOAT_KEYS and isinstance(value, (int, float)):
            out[apr_key] = float(value)
        elif isinstance(value, int) and apr_key not in FLOAT_KEYS:
            out[apr_key] = value
    return out


def family_of(model_type: Any) -> Family | None:
    """The family of an HF `model_type`, or None for one we only convert generically."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def get_family(name: str, path: Any = None) -> Family:
    """The family named `name`.

    Raises:
        UnsupportedArchitecture: not one of FAMILIES.
    """
    family = family_of(name)
    if family is None:
        raise UnsupportedArchitecture(
            path, f"architecture {name!r} is not supported; supported decoder families: {', '.join(FAMILIES)}"
        )
    return family


def _setting(arch: Mapping[str, Any], key: str) -> Any:
    """`arch[key]`, else the same key of its nested `hf_config`."""
    if arch.get(key) is not None:
        return arch[key]
    hf_config = arch.get("hf_config")
    return hf_config.get(key) if isinstance(hf_config, Mapping) else None


def is_tied(arch: Mapping[str, Any], family: Family) -> bool:
    """Whether the model ties lm_head to the embedding (either spelling, or the family default)."""
    for key in ("tied_embeddings", "tie_word_embeddings"):
        value = _setting(arch, key)
        if isinstance(value, bool):
            return value
    return family.tie_default


def attention_bias_setting(arch: Mapping[str, Any], family: Family) -> Any:
    """The stated `attention_bias`: APR metadata's, else the HF config's where the family reads it; or None."""
    if arch.get("attention_bias") is not None:
        return arch["attention_bias"]
    hf_config = arch.get("hf_config")
    return hf_config.get("attention_bias") if family.attention_bias_key and isinstance(hf_config, Mapping) else None


def has_attention_bias(arch: Mapping[str, Any], family: Family) -> bool:
    """Whether q/k/v carry biases: the stated `attention_bias`, else the family's default."""
    value = attention_bias_setting(arch, family)
    return value if isinstance(value, bool) else family.attention_bias


def dimensions(arch: Mapping[str, Any], path: Any = None) -> dict[str, int]:
    """Named dimensions of the shape templates, from APR architecture metadata.

    Raises:
        MissingConfigKey: a key without a well-defined default is absent.
        CorruptMetadata: a size that is not a positive integer.
    """
    required = ("hidden_size", "num_layers", "num_heads", "vocab_size", "intermediate_size")
    missing = [k for k in required if not isinstance(arch.get(k), int)]
    if missing:
        raise MissingConfigKey(path, f"architecture metadata lacks {', '.join(missing)}")
    bad = [f"{k} {arch[k]!r}" for k in (*required, "num_kv_heads", "head_dim")
           if arch.get(k) is not None and (isinstance(arch[k], bool) or not isinstance(arch[k], int) or arch[k] <= 0)]
    if bad:
        raise CorruptMetadata(path, f"architecture sizes must be positive integers: {', '.join(bad)}")
    num_heads = arch["num_heads"]
    head_dim = arch.get("head_dim") or arch["hidden_size"] // num_heads
    return {
        "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
        "vocab_size": arch["vocab_size"], "num_layers": arch["num_layers"],
        "q_dim": num_heads * head_dim, "kv_dim": (arch.get("num_kv_heads") or num_heads) * head_dim,
    }


def tensor_shapes(
    family: Family, dims: Mapping[str, int], *, attention_bias: bool, head: bool
) -> dict[str, tuple[int, ...]]:
    """Every tensor (HF name -> shape) of a `family` model, in model order.

    `head` includes `lm_head.weight` (an untied head, or aprender's copy of a tied one).
    """
    out: dict[str, tuple[int, ...]] = {}
    for template, shape in _templates(family, dims, attention_bias, head):
        names = [template.format(i=i) for i in range(dims["num_layers"])] if "{i}" in template else [template]
        out.update((name, shape) for name in names)
    return out


def parameter_count(family: Family, dims: Mapping[str, int], *, attention_bias: bool, head: bool) -> int:
    """Elements of all `tensor_shapes()`, computed per template (no name is listed: any layer count is cheap)."""
    return sum(
        math.prod(shape) * (dims["num_layers"] if "{i}" in template else 1)
        for template, shape in _templates(family, dims, attention_bias, head)
    )


def _templates(family: Family, dims: Mapping[str, int], attention_bias: bool, head: bool):
    """(template, resolved shape) of the TENSORS present in this model."""
    present = {None: True, "qkv_bias": attention_bias, "o_bias": attention_bias and family.o_proj_bias, "head": head}
    return [(template, tuple(dims[d] for d in shape)) for template, shape, when in TENSORS if present[when]]


def expected_tensors(
    family_name: str, arch: Mapping[str, Any], *, with_head_copy: bool = False, path: Any = None
) -> dict[str, tuple[int, ...]]:
    """Every tensor (HF name -> shape) a model of this family and APR architecture metadata needs,
    sorted by name (the order the converters check and name them in).

    `lm_head.weight` is included when the model is untied, or when `with_head_copy` asks for
    aprender's copy of a tied head.

    Raises:
        UnsupportedArchitecture, MissingConfigKey, CorruptMetadata.
    """
    family = get_family(family_name, path)
    shapes = tensor_shapes(
        family, dimensions(arch, path), attention_bias=has_attention_bias(arch, family),
        head=with_head_copy or not is_tied(arch, family),
    )
    return dict(sorted(shapes.items()))


# -- GGUF ------------------------------------------------------------------------------------
# GGUF `general.architecture` -> family name.
GGUF_ARCHITECTURES: dict[str, str] = {f.gguf_architecture: f.name for f in FAMILIES.values() if f.gguf_architecture}

# `{arch}.<suffix>` GGUF metadata key -> HF config.json key (gguf-py Keys.LLM / Attention / Rope).
GGUF_CONFIG_KEYS: dict[str, str] = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.value_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# HF keys a GGUF may omit, with the value llama.cpp itself assumes then (llama-model.cpp).
# num_key_value_heads defaults to num_attention_heads, vocab_size to the embedding's rows.
GGUF_CONFIG_DEFAULTS: dict[str, float] = {"rope_theta": 10000.0}
GGUF_REQUIRED_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                      "attention.layer_norm_rms_epsilon", "context_length")
# `tokenizer.ggml.<key>` -> HF config.json key.
GGUF_TOKEN_ID_KEYS: dict[str, str] = {
    "bos_token_id": "bos_token_id",
    "eos_token_id": "eos_token_id",
    "padding_token_id": "pad_token_id",
}

# GGUF tensor name -> HF name; `{i}` is the layer index. None = dropped on purpose.
GGUF_TENSOR_NAMES: dict[str, str | None] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    # llama3-style rope scaling factors: our plain-RoPE model cannot use them (reported).
    "rope_freqs.weight": None,
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    # old llama GGUFs carry precomputed rotary tables; the model computes its own.
    "blk.{i}.attn_rot_embd": None,
}

# HF name suffix -> HF config key of the head count its rows are grouped by in llama.cpp's
# permutation (convert_hf_to_gguf.py LlamaModel.modify_tensors: q by num_attention_heads,
# k by num_key_value_heads; biases like their weights).
QK_PERMUTE_HEADS: dict[str, str] = {
    "self_attn.q_proj.weight": "num_attention_heads",
    "self_attn.q_proj.bias": "num_attention_heads",
    "self_attn.k_proj.weight": "num_key_value_heads",
    "self_attn.k_proj.bias": "num_key_value_heads",
}

_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_to_hf_name(gguf_name: str) -> tuple[str | None, bool]:
    """(HF name, or None for a deliberate skip; known). `known` is False for a name no table has."""
    match = _GGUF_LAYER.match(gguf_name)
    template = gguf_name if match is None else f"blk.{{i}}.{match.group(2)}"
    if template not in GGUF_TENSOR_NAMES:
        return None, False
    target = GGUF_TENSOR_NAMES[template]
    if target is None or match is None:
        return target, True
    return target.replace("{i}", str(int(match.group(1)))), True


_HF_LAYER = re.compile(r"^(.+?)\.(\d+)\.(.+)$")
# The same table read backwards: HF name template -> GGUF name template (deliberate skips left out).
HF_TO_GGUF_NAMES: dict[str, str] = {hf: gguf for gguf, hf in GGUF_TENSOR_NAMES.items() if hf is not None}


def hf_to_gguf_name(hf_tensor: str) -> str | None:
    """The GGUF name llama.cpp gives the HF tensor `hf_tensor`, or None when no table entry has it."""
    match = _HF_LAYER.match(hf_tensor)
    template = hf_tensor if match is None else f"{match.group(1)}.{{i}}.{match.group(3)}"
    target = HF_TO_GGUF_NAMES.get(template)
    if target is None or match is None:
        return target
    return target.replace("{i}", str(int(match.group(2))))


def permute_heads_key(hf_tensor: str) -> str | None:
    """The config key of the head count to un-permute `hf_tensor` by; None if it is not q/k."""
    return next((key for suffix, key in QK_PERMUTE_HEADS.items() if hf_tensor.endswith(suffix)), None)
