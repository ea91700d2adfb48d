"""Generation with the KV cache against transformers' generate on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
import transformers

from apr_converters.hf_to_apr import convert_hf_to_apr
from apr_format.errors import InvalidArgument
from apr_trainer.generate import Sampling, check_lengths, generate, next_token, sampling_scores
from apr_trainer.model import DecoderLM, KVCache

from apr_testing import transformers_greedy

PROMPT = [5, 17, 42, 7, 99, 3]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
    """(transformers model, our DecoderLM) with the same fp32 weights."""
    folder = request.getfixturevalue(f"hf_{request.param}")
    apr = tmp_path_factory.mktemp("gen") / "m.apr"
    convert_hf_to_apr(folder, apr)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None  # compare all tokens; EOS is tested on its own
    return reference, DecoderLM.from_apr(apr, dtype=torch.float32).eval()


def test_cached_logits_equal_full_forward(pair):
    _, ours = pair
    ids = torch.tensor([PROMPT + [11, 12, 13, 14]])
    cache = KVCache(ours.config, 1, ids.shape[1], "cpu", torch.float32)
    with torch.no_grad():
        full = ours(ids)
    steps = [ours.forward_cached(ids[:, :4], cache), ours.forward_cached(ids[:, 4:7], cache)]
    steps += [ours.forward_cached(ids[:, i : i + 1], cache) for i in range(7, ids.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == ids.shape[1]


def test_greedy_equals_transformers_for_20_tokens(pair):
    reference, ours = pair
    result = generate(ours, PROMPT, 20)
    assert result.tokens == transformers_greedy(reference, PROMPT, 20)
    assert len(result.tokens) == 20 and not result.stopped_at_eos


def test_stops_after_the_first_eos_like_transformers(pair):
    reference, ours = pair
    free = generate(ours, PROMPT, 12).tokens
    eos = free[len(free) // 2]  # a token greedy decoding is sure to reach
    result = generate(ours, PROMPT, 12, eos_ids={eos})
    assert result.tokens == free[: free.index(eos) + 1] and result.stopped_at_eos
    assert result.tokens == transformers_greedy(reference, PROMPT, 12, eos_token_id=eos)


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair):
    _, ours = pair
    hot = Sampling(temperature=5.0, seed=3)
    first, again = generate(ours, PROMPT, 15, sampling=hot).tokens, generate(ours, PROMPT, 15, sampling=hot).tokens
    assert first == again
    assert first != generate(ours, PROMPT, 15).tokens  # a hot sampler leaves the greedy path
    assert generate(ours, PROMPT, 15, sampling=Sampling(temperature=5.0, top_k=1, seed=9)).tokens == \
        generate(ours, PROMPT, 15).tokens


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.3), (40, 0.9)])
def test_filtered_scores_equal_transformers_warpers(top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p:
        warpers.append(TopPLogitsWarper(top_p))
    expected = warpers(None, logits.clone())
    ours = sampling_scores(logits, Sampling(temperature=0.7, top_k=top_k, top_p=top_p))
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    assert 1 < int(torch.isfinite(ours).sum()) < 300  # the filter did keep some and drop some
    assert torch.allclose(ours.softmax(-1), expected.softmax(-1), atol=1e-7)
    drawn = {next_token(logits, Sampling(0.7, top_k, top_p), torch.Generator().manual_seed(s)) for s in range(50)}
    assert all(torch.isfinite(ours[0, t]) for t in drawn)


@pytest.mark.parametrize("sampling, flag", [
    (Sampling(temperature=-1), "--temperature"), (Sampling(temperature=1, top_k=0), "--top-k"),
    (Sampling(temperature=1, top_p=1.5), "--top-p"), (Sampling(top_k=5), "--top-k"),
])
def test_bad_sampling_names_the_flag(sampling, flag):
    with pytest.raises(InvalidArgument, match=f"^{flag}: "):
        sampling.check()


def test_lengths_beyond_the_context_are_refused():
    with pytest.raises(InvalidArgument, match="^-n: must be at least 1"):
        check_lengths(3, 0, 128, "m")
    with pytest.raises(InvalidArgument, match="^--prompt: is 130 tokens, the context of m is 128"):
        check_lengths(130, 1, 128, "m")
    with pytest.raises(InvalidArgument, match="use -n 28 or less"):
        check_lengths(100, 29, 128, "m")
    check_lengths(100, 28, 128, "m")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_greedy_and_seeded_sampling(pair):
    reference, ours = pair
    gpu = ours.to("cuda")
    try:
        assert generate(gpu, PROMPT, 20).tokens == transformers_greedy(reference, PROMPT, 20)
        hot = Sampling(temperature=2.0, top_p=0.9, seed=4)
        assert generate(gpu, PROMPT, 10, sampling=hot).tokens == generate(gpu, PROMPT, 10, sampling=hot).tokens
    finally:
        ours.to("cpu")
