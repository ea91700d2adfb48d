"""`apr eval`: perplexity of a causal LM (.apr, HF folder, .gguf or hf:// id) on text or tokens."""

from __future__ import annotations

import click

from .model_input import model_options, open_model, warn
from .render import echo_json, escape

DEFAULT_SEQ_LEN = 512


@click.command("eval")
@click.argument("model", metavar="MODEL")
@click.option("--data", required=True, metavar="TEXT_OR_TOKENS",
              help="Text (.txt, .jsonl with \"text\", or a folder of them) or tokens (.bin as `apr pretrain` reads).")
@click.option("--seq-len", "seq_len", type=int, default=None,
              help=f"Tokens per window [default: {DEFAULT_SEQ_LEN}, or the model's context when shorter].")
@click.option("--batch-size", "batch_size", type=int, default=8, show_default=True, help="Windows per forward pass.")
@click.option("--max-tokens", "max_tokens", type=int, default=None, help="Use only the first N tokens of the data.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def eval_cmd(
    model: str, data: str, seq_len: int | None, batch_size: int, max_tokens: int | None, tokenizer: str | None,
    device: str, dtype: str, as_json: bool,
) -> None:
    """Perplexity of MODEL (.apr, HF folder, .gguf or hf://ORG/NAME[@REVISION]) on --data.

    \b
    Definition: the text is tokenized with the model's own tokenizer (or --tokenizer) without
    adding special tokens (no BOS, no EOS; documents are concatenated); a token file is used
    as stored. The token stream is cut into consecutive non-overlapping windows of --seq-len
    tokens (the last partial window is dropped); each window predicts its tokens 2..L from
    their prefixes; loss = mean cross-entropy over all predicted tokens (nats);
    perplexity = exp(loss). `tokens` is the number of predicted tokens: windows x (seq_len - 1).

    \b
    Example:
      apr eval model.apr --data fixtures/tiny-corpus.txt --seq-len 256 --json
    """
    from apr_trainer.evaluate import eval_tokens, perplexity

    with open_model(model, device=device, dtype=dtype) as loaded:
        stream = eval_tokens(data, lambda: loaded.tokenizer(tokenizer), vocab_rows=loaded.model.config.vocab_size,
                             where=model)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, loaded.context_length)
            if seq_len < DEFAULT_SEQ_LEN:
                warn(f"--seq-len {seq_len}: the context of {model} is shorter than the default {DEFAULT_SEQ_LEN}")
        result = perplexity(loaded.model, stream, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    figures = {"perplexity": result.perplexity, "loss": result.loss, "tokens": result.tokens,
               "windows": result.windows, "seq_len": result.seq_len, "model": model, "data": data}
    if as_json:
        echo_json(figures)
    else:
        click.echo(
            f"perplexity {result.perplexity:.4f} (loss {result.loss:.4f} nats over {result.tokens:,} predicted tokens, "
            f"{result.windows:,} windows of {result.seq_len}) {escape(model)} on {escape(data)}"
        )
