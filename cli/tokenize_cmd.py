"""`apr tokenize`: text (.txt/.md, JSON lines, Parquet; compressed; folders, globs) -> token shards + index."""

from __future__ import annotations

import os
import sys
import time

import click

from apr_format.errors import InvalidArgument
from apr_trainer.pretokenize import TokenizeOptions, tokenize_corpus
from apr_trainer.tokenization import EncodedBatch, load_tokenizer

from .render import echo_json, escape

_SUFFIXES = {"K": 10**3, "M": 10**6, "G": 10**9}


def _count(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """`100M`, `5K`, `2G` or a plain number."""
    text = value.strip().upper()
    try:
        return int(float(text[:-1]) * _SUFFIXES[text[-1]]) if text[-1:] in _SUFFIXES else int(text)
    except ValueError:
        raise InvalidArgument(None, f"expected a count like 100M, got {value!r}",
                              flag=f"--{param.name.replace('_', '-')}") from None


@click.command("tokenize")
@click.argument("sources", nargs=-1, required=True, metavar="INPUT...")
@click.option("-o", "--out", "out", required=True, metavar="OUT_DIR",
              help="Folder to write: PREFIX-00000.bin shards (+ .bin.json sidecars) and index.json.")
@click.option("--tokenizer", metavar="tokenizer.json", help="HF tokenizers file to use.")
@click.option("--from", "from_apr", metavar="MODEL.apr", help="Use the tokenizer carried inside this .apr.")
@click.option("--text-field", default="text", show_default=True, help="JSON key / Parquet column holding the text.")
@click.option("--doc-separator", metavar="TEXT", help="In .txt files, this text ends a document, e.g. '<|endoftext|>' "
              "(default: each .txt file is one document).")
@click.option("--split-paragraphs", is_flag=True, help="In .txt files, blank lines end a document.")
@click.option("--no-separator", is_flag=True,
              help="Allow a tokenizer without an end-of-text token (documents are then joined without one).")
@click.option("--shard-tokens", default="100M", show_default=True, callback=_count, metavar="N",
              help="Tokens per shard (K/M/G suffixes).")
@click.option("--prefix", default="tokens", show_default=True, help="Shard file name prefix.")
@click.option("--dtype", type=click.Choice(["auto", "uint16", "uint32"]), default="auto", show_default=True,
              help="Token width; auto = uint16 when the vocabulary fits.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in OUT_DIR from its last complete shard.")
@click.option("--force", is_flag=True, help="Replace the shards and index of an earlier run in OUT_DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the index as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No log lines on stderr (errors still show).")
def tokenize_cmd(sources: tuple[str, ...], out: str, tokenizer: str | None, from_apr: str | None, resume: bool,
                 force: bool, as_json: bool, quiet: bool, **options) -> None:
    """Tokenize INPUT files, folders or globs once, streaming, into token shards for `apr pretrain --data`.

    A .txt/.md file is one document (or several with --doc-separator / --split-paragraphs); each
    JSON line or Parquet row is one. The tokenizer's end-of-text token follows every document; no
    BOS or template tokens are added. A progress bar shows on a terminal.

    Example: apr tokenize 'fineweb/*.parquet' -o fineweb-tok --from model.apr --shard-tokens 100M
    """
    if (tokenizer is None) == (from_apr is None):
        raise InvalidArgument(None, "give exactly one of --tokenizer tokenizer.json or --from model.apr", flag="--tokenizer")
    if resume and force:
        raise InvalidArgument(None, "cannot be combined with --force", flag="--resume")
    log = (lambda line: None) if quiet else (lambda line: click.echo(escape(line), err=True))
    info = load_tokenizer(tokenizer, from_apr)
    # drawn like render.ByteProgress (terminal only, not under NO_COLOR or CI), with tokens/s added
    bar = _Bar() if sys.stderr.isatty() and not (quiet or os.environ.get("NO_COLOR") or os.environ.get("CI")) else None
    try:
        index = tokenize_corpus(list(sources), out, info, TokenizeOptions(**options), resume=resume, force=force,
                                log=log, on_batch=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    if as_json:
        echo_json({"output": out, **index})
    else:
        click.echo(f"{escape(out)}: {index['num_tokens']:,} tokens, {index['documents']:,} documents in "
                   f"{len(index['shards'])} shard(s) ({index['dtype']}, vocab_size {index['vocab_size']}, "
                   f"max id {index['max_id']}) from {len(index['inputs'])} file(s); index {escape(out)}/index.json")


class _Bar:
    """One terminal line: share of the input bytes, tokens, tokens/s, ETA."""

    def __init__(self) -> None:
        self.start, self.tokens = time.monotonic(), 0

    def update(self, batch: EncodedBatch, done: float) -> None:
        self.tokens += len(batch.ids)
        elapsed = max(time.monotonic() - self.start, 1e-9)
        eta = elapsed * (1 - done) / done if done > 0 else 0.0
        click.echo(f"\r{done:6.1%} of input bytes  {self.tokens:,} tokens  {self.tokens / elapsed:,.0f} tokens/s  "
                   f"ETA {eta / 60:,.1f} min ", err=True, nl=False)

    def close(self) -> None:
        click.echo("", err=True)
