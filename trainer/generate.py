"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, seed), stopping at EOS."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from apr_format.errors import InvalidArgument

from .model import DecoderLM, KVCache


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy (argmax); otherwise transformers' order:
    scale by 1/temperature, keep the top_k scores, keep the smallest set of probability >= top_p, sample."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        """Raises InvalidArgument naming the flag of a value out of range or without effect."""
        if not self.temperature >= 0:
            raise InvalidArgument("--temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidArgument("--top-k", f"must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InvalidArgument("--top-p", f"must be in (0, 1], got {self.top_p}")
        if self.temperature == 0:
            for flag, value in (("--top-k", self.top_k), ("--top-p", self.top_p)):
                if value is not None:
                    raise InvalidArgument(flag, "has no effect with greedy decoding; add --temperature > 0")


@dataclass(frozen=True)
class Generation:
    """The generated ids (EOS included when it stopped the run) and how long generating took."""

    tokens: list[int]
    stopped_at_eos: bool
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else 0.0


def check_new_tokens(max_new_tokens: int) -> None:
    """Raises InvalidArgument unless at least one token is asked for."""
    if max_new_tokens < 1:
        raise InvalidArgument("-n", f"must be at least 1, got {max_new_tokens}")


def check_lengths(prompt_tokens: int, max_new_tokens: int, context: int, where: str) -> None:
    """Refuse runs the model's context cannot hold (never truncate the prompt silently).

    Raises:
        InvalidArgument: -n < 1, an empty prompt, or prompt + -n longer than `context`.
    """
    check_new_tokens(max_new_tokens)
    if prompt_tokens == 0:
        raise InvalidArgument("--prompt", "is empty after tokenization; give at least one token of text")
    if prompt_tokens >= context:
        raise InvalidArgument(
            "--prompt", f"is {prompt_tokens} tokens, the context of {where} is {context} tokens; shorten it"
        )
    if prompt_tokens + max_new_tokens > context:
        raise InvalidArgument(
            "-n", f"{max_new_tokens} new tokens after a {prompt_tokens}-token prompt exceed the context of "
            f"{context} tokens; use -n {context - prompt_tokens} or less",
        )


@torch.no_grad()
def generate(
    model: DecoderLM, prompt: Sequence[int], max_new_tokens: int, *, sampling: Sampling = Sampling(),
    eos_ids: Collection[int] = (), on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Continue `prompt` by up to `max_new_tokens` ids: one pass over the prompt, then one cached
    one-token step per new id. Stops after an id in `eos_ids` (which is kept in the output).

    Raises:
        InvalidArgument: from `Sampling.check`.
    """
    sampling.check()
    device, dtype = model.head_weight.device, model.head_weight.dtype
    start = time.perf_counter()
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, dtype)
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    logits = model.forward_cached(torch.tensor([list(prompt)], device=device), cache)[:, -1]
    tokens: list[int] = []
    while True:
        token = next_token(logits, sampling, generator)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids or len(tokens) == max_new_tokens:
            break
        logits = model.forward_cached(torch.tensor([[token]], device=device), cache)[:, -1]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return Generation(tokens, tokens[-1] in eos_ids, time.perf_counter() - start)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next id from the last position's logits [1, vocab] (see `Sampling`)."""
    if sampling.temperature == 0:
        return int(logits.argmax(-1))
    probs = sampling_scores(logits, sampling).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sampling_scores(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """float32 logits / temperature with the tokens top-k / top-p leave out set to -inf."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - sampling.top_p
        drop[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens (such as EOS) left out."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Decodes ids as they arrive and hands `emit` only text that is complete (no half UTF-8 character)."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self.tokenizer, self.emit = tokenizer, emit
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.text()
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self) -> None:
        self._show(self.text())

    def text(self) -> str:
        """Everything so far (see `decode`)."""
        return decode(self.tokenizer, self.ids)

    def _show(self, text: str) -> None:
        if len(text) > self.shown:
            self.emit(text[self.shown:])
            self.shown = len(text)
