"""`apr run`: generate a continuation of a prompt (greedy by default) with a KV cache."""

from __future__ import annotations

import sys

import click

from .model_input import model_options, open_model
from .render import echo_json


@click.command("run")
@click.argument("model", metavar="MODEL")
@click.option("-p", "--prompt", required=True, help="Text to continue (with --chat: the user message).")
@click.option("-n", "--max-new-tokens", "max_new_tokens", type=int, default=32, show_default=True,
              help="Tokens to generate at most.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 = greedy (argmax); above 0 samples from softmax(logits / temperature).")
@click.option("--top-k", "top_k", type=int, default=None, help="Sample only among the K most likely tokens.")
@click.option("--top-p", "top_p", type=float, default=None,
              help="Sample only among the most likely tokens whose probabilities sum to P (nucleus).")
@click.option("--seed", type=int, default=None, help="Seed of the sampler (same seed, same output).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the checkpoint's chat template (sandboxed Jinja).")
@click.option("--ignore-eos", "ignore_eos", is_flag=True, help="Do not stop at the end-of-sequence token.")
@model_options
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (prompt, generated ids, text, count, speed) instead of streaming text.")
def run_cmd(
    model: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
    seed: int | None, chat: bool, ignore_eos: bool, tokenizer: str | None, device: str, dtype: str, as_json: bool,
) -> None:
    """Continue the -p prompt with MODEL (.apr, HF folder, .gguf or hf://ORG/NAME[@REVISION]).

    The prompt is tokenized as transformers' `tokenizer(prompt)` does (the tokenizer's own
    special tokens, e.g. a BOS, included); with --chat it is rendered through the checkpoint's
    chat template as a user message with the generation prompt, then tokenized without adding
    special tokens. Generation stops after -n tokens or at an EOS token (the tokenizer's and
    generation_config.json's), unless --ignore-eos. The text is streamed to stdout as it comes,
    special tokens left out.

    \b
    Examples:
      apr run model.apr -p "The capital of France is" -n 16
      apr run hf://HuggingFaceTB/SmolLM2-135M-Instruct --chat -p "Hi!" --temperature 0.7 --top-p 0.9 --seed 1
    """
    from apr_trainer.chat_template import SPECIAL_TOKENS_KEY, chat_template, render_chat
    from apr_trainer.generate import Sampling, TextStream, check_lengths, check_new_tokens, decode, generate

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    sampling.check()
    check_new_tokens(max_new_tokens)  # before any model is loaded
    with open_model(model, device=device, dtype=dtype) as loaded:
        info = loaded.tokenizer(tokenizer)
        text = prompt
        if chat:
            special = loaded.metadata.get(SPECIAL_TOKENS_KEY)
            text = render_chat(chat_template(loaded.metadata, model), [{"role": "user", "content": prompt}],
                               special if isinstance(special, dict) else {}, model)
        ids = info.tokenizer.encode(text, add_special_tokens=not chat).ids
        check_lengths(len(ids), max_new_tokens, loaded.context_length, model)
        stream = TextStream(info.tokenizer, emit=_write)
        result = generate(
            loaded.model, ids, max_new_tokens, sampling=sampling,
            eos_ids=() if ignore_eos else loaded.eos_ids(info), on_token=None if as_json else stream.push,
        )
    if as_json:
        echo_json({"prompt": text, "tokens": result.tokens, "text": decode(info.tokenizer, result.tokens),
                   "token_count": len(result.tokens), "tokens_per_s": result.tokens_per_s})
    else:
        stream.finish()
        _write("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
