"""The decoder-only transformer the trainer trains: one class for Llama and Qwen2, HF parameter names."""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from apr_format.architecture import ArchitectureConfig, read_architecture
from apr_format.init_tensors import load_init_tensors

IGNORE_INDEX = -100
# Rows of the flattened [B*T, hidden] states whose logits are materialised at once in the loss:
# about 2**28 logits (1 GiB in fp32) per chunk, so a 151,936-wide vocabulary never holds
# [B*T, vocab] fp32 logits (nor their gradient) in memory.
LOSS_CHUNK_LOGITS = 2**28
# Up to this many logits (64 MiB in fp32) the loss is one plain cross-entropy: recomputing the head
# in backward would cost more time than the memory it saves (tiny models, short batches).
SMALL_LOSS_LOGITS = 2**24
INIT_STD = 0.02  # HF's initializer_range for Llama and Qwen2
_GQA_IN_SDPA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 and cast back (as HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_cos_sin(config: ArchitectureConfig, seq_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] for positions 0..T-1, in fp32 then cast (HF's default RoPE)."""
    half = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).float() / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**half)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half (NEOX) RoPE, the convention of HF-layout q/k weights (spec: `rope_type`)."""
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and optional q/k/v (and o) biases."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = nn.Linear(h, config.num_heads * d, bias=config.attention_bias)
        self.k_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.attention_bias)
        self.v_proj = nn.Linear(h, config.num_kv_heads * d, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_heads * d, h, bias=config.o_proj_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and _GQA_IN_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if groups > 1:  # older torch: kv head j serves query heads j*groups .. j*groups+groups-1
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, decoder layers and final norm: HF's `model.` submodule."""

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderLM(nn.Module):
    """Llama / Qwen2 / Mistral causal LM whose state_dict keys are exactly the HF (and .apr) tensor names.

    Attention is plain causal: a sequence longer than a Mistral `sliding_window` is refused
    (`ArchitectureConfig.check_sequence_length`), never computed with the wrong mask.

    A fresh model is initialised like HF: normal(0, 0.02) linear and embedding weights, zero
    biases, ones for the norms. A tied model has no `lm_head` module: the head is the
    embedding matrix.
    """

    def __init__(self, config: ArchitectureConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @property
    def head_weight(self) -> torch.Tensor:
        """The [vocab, hidden] output projection (the embedding when tied)."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def reset_parameters(self) -> None:
        """HF-style initialisation (see the class docstring)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def hidden_states(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden]."""
        self.config.check_sequence_length(input_ids.shape[1])
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(self.config, input_ids.shape[1], x.device, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.model.norm(x)

    def forward(self, input_ids: torch.LongTensor, targets: torch.LongTensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] when `targets` is None, else the mean cross-entropy.

        `targets` [B, T] are already shifted (targets[:, t] is the token after input_ids[:, t],
        nanoGPT's convention); positions equal to -100 are ignored. The loss is computed over
        chunks of rows, each chunk's logits recomputed in backward, so the full [B*T, vocab]
        logits never exist; value and gradients equal F.cross_entropy on the full logits.
        """
        h = self.hidden_states(input_ids)
        if targets is None:
            return F.linear(h, self.head_weight)
        return chunked_cross_entropy(h.reshape(-1, h.shape[-1]), self.head_weight, targets.reshape(-1))

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_apr(cls, path: str | os.PathLike, dtype=None, device="cpu") -> "DecoderLM":
        """The model of the .apr at `path` with its weights, every parameter checked.

        The module is built on the meta device and the loaded tensors are assigned, not
        copied (zero-copy on CPU when `dtype` is the file's). `dtype=None` keeps the file's
        dtype; a file mixing float dtypes is promoted to the widest (lossless), since one
        model computes in one dtype. Raises what `read_architecture` and `load_init_tensors` raise.
        """
        config = read_architecture(path)
        tensors = load_init_tensors(path, config, dtype=dtype, device=device)
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) > 1:
            widest = functools.reduce(torch.promote_types, dtypes)
            tensors = {name: t.to(widest) for name, t in tensors.items()}
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(tensors, strict=True, assign=True)
        return model


def _chunk_loss_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight.T` against `targets` (-100 ignored), chunk by chunk.

    Each chunk runs under activation checkpointing: only `h` is kept, the chunk's logits are
    recomputed in backward (one extra head matmul) instead of being stored.
    """
    if h.shape[0] * weight.shape[0] <= min(SMALL_LOSS_LOGITS, LOSS_CHUNK_LOGITS):
        return _chunk_loss_sum(h, weight, targets) / (targets != IGNORE_INDEX).sum()
    rows = max(1, LOSS_CHUNK_LOGITS // weight.shape[0])
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        chunk = slice(start, start + rows)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss_sum, h[chunk], weight, targets[chunk], use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h[chunk], weight, targets[chunk])
    return total / (targets != IGNORE_INDEX).sum()
