"""GGUF <-> HF naming tables: metadata keys, tensor names and which GGUF families had q/k permuted."""

from __future__ import annotations

import re

# GGUF `general.architecture` -> HF model_type (a key of families.FAMILIES, whose
# `gguf_qk_permuted` says whether llama.cpp's converter permuted that family's q/k rows).
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
}

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

_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> tuple[str | None, bool]:
    """(HF name, or None for a deliberate skip; known). `known` is False for a name no table has."""
    match = _LAYER.match(gguf_name)
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


def gguf_name(hf_tensor: str) -> str | None:
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
