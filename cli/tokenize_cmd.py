"""`apr tokenize`: text (.txt, .jsonl, folders) -> token .bin + .bin.json sidecar, streaming and atomic."""

from __future__ import annotations

import os

import click

from apr_format.errors import InvalidArgument, OutputExists
from apr_trainer.data import tokenize_corpus
from apr_trainer.tokenization import load_tokenizer

from .render import echo_json, escape


@click.command("tokenize")
@click.argument("source", metavar="INPUT")
@click.option("-o", "--out", "out", required=True, metavar="OUT.bin", help="Token file to write (+ OUT.bin.json).")
@click.option("--tokenizer", metavar="tokenizer.json", help="HF tokenizers file to use.")
@click.option("--from", "from_apr", metavar="MODEL.apr", help="Use the tokenizer carried inside this .apr.")
@click.option("--dtype", type=click.Choice(["auto", "uint16", "uint32"]), default="auto", show_default=True,
              help="Token width; auto = uint16 when the vocabulary fits.")
@click.option("--force", is_flag=True, help="Overwrite OUT.bin if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the sidecar as JSON on stdout.")
def tokenize_cmd(source: str, out: str, tokenizer: str | None, from_apr: str | None, dtype: str, force: bool,
                 as_json: bool) -> None:
    """Tokenize INPUT (.txt, .jsonl with a "text" field, or a folder of them) once, for `apr pretrain --data`.

    Each .txt file and each .jsonl line is a document; the tokenizer's end-of-text token follows
    every document. No BOS or template tokens are added.
    """
    if (tokenizer is None) == (from_apr is None):
        raise InvalidArgument("--tokenizer", "give exactly one of --tokenizer tokenizer.json or --from model.apr")
    if os.path.exists(out) and not force:
        raise OutputExists(out, "already exists (use --force to overwrite)")
    info = load_tokenizer(tokenizer, from_apr)
    meta = tokenize_corpus(source, out, info, dtype, overwrite=force)
    if as_json:
        echo_json({"output": out, **meta})
    else:
        click.echo(f"{escape(out)}: {meta['num_tokens']:,} tokens ({meta['dtype']}, vocab_size {meta['vocab_size']}, "
                   f"max id {meta['max_id']}) from {meta['files']} file(s); sidecar {escape(out)}.json")
