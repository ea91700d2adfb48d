"""Perplexity against the same definition computed with transformers on the same weights (fp32)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_format.errors import InvalidArgument
from apr_trainer.data import TokenStream
from apr_trainer.evaluate import perplexity
from apr_trainer.model import DecoderLM

from apr_testing import learnable_tokens, transformers_loss


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("seq_len, batch_size", [(64, 3), (33, 8)])
def test_perplexity_equals_transformers(family, seq_len, batch_size, request, tmp_path):
    folder = request.getfixturevalue(f"hf_{family}")
    convert_hf_to_apr(folder, tmp_path / "m.apr")
    ours = DecoderLM.from_apr(tmp_path / "m.apr", dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = learnable_tokens(700, ours.config.vocab_size)
    result = perplexity(ours, TokenStream([ids], "ids"), seq_len=seq_len, batch_size=batch_size)
    loss, windows = transformers_loss(reference, ids, seq_len)
    assert (result.windows, result.tokens, result.seq_len) == (windows, windows * (seq_len - 1), seq_len)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-4)


def test_max_tokens_uses_only_the_first_tokens(hf_qwen2, tmp_path):
    convert_hf_to_apr(hf_qwen2, tmp_path / "m.apr")
    ours = DecoderLM.from_apr(tmp_path / "m.apr").eval()
    ids = learnable_tokens(500, 300)
    capped = perplexity(ours, TokenStream([ids], "ids"), seq_len=50, max_tokens=260)
    first = perplexity(ours, TokenStream([ids[:250]], "ids"), seq_len=50)
    assert capped == first and capped.windows == 5


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "^--seq-len: must be between 2 and the model's context of 128, got 1"),
    ({"seq_len": 129}, "^--seq-len: .* got 129"),
    ({"seq_len": 64, "batch_size": 0}, "^--batch-size: must be at least 1"),
    ({"seq_len": 64, "max_tokens": 63}, r"^ids: has 63 tokens \(--max-tokens\), fewer than one window of --seq-len 64"),
])
def test_bad_windows_are_refused(hf_qwen2, tmp_path, kwargs, message):
    convert_hf_to_apr(hf_qwen2, tmp_path / "m.apr")
    ours = DecoderLM.from_apr(tmp_path / "m.apr").eval()
    with pytest.raises(InvalidArgument, match=message):
        perplexity(ours, TokenStream([learnable_tokens(100, 300)], "ids"), **kwargs)
