"""`apr export`: an .apr file -> an HF folder (config, shards, index, tokenizer) or one safetensors file."""

from __future__ import annotations

import sys

import click

from apr_format.errors import InvalidArgument

from .options import no_verify_option, output_option, warn_unverified
from .render import ByteProgress, echo_json, human_bytes, report_dict


@click.command("export")
@click.argument("src", metavar="MODEL.apr")
@output_option("Output folder (hf), or file / '-' for stdout (safetensors).", "OUT")
@click.option("--format", "fmt", type=click.Choice(["hf", "safetensors"]), default=None,
              help="An hf folder, or one safetensors file.",
              show_default="hf; safetensors when OUT ends in .safetensors or is -")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Split weights into shards of at most SIZE (e.g. 2GB, 500MB).",
              show_default="the source's own split when known, else 5GB")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@no_verify_option()
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export_cmd(
    src: str, output: str, fmt: str | None, max_shard_size: str | None, force: bool, no_verify: bool, quiet: bool,
    as_json: bool,
) -> None:
    """Export MODEL.apr for transformers: `from_pretrained(OUT)` loads the folder.

    aprender's lm_head copy of a tied model is left out, so HF -> APR -> HF gives back the
    source files. The footer CRC-32 is checked while the tensors stream; a corrupt file is
    refused before anything is written.

    \b
    Examples:
      apr export model.apr -o hf-model/
      apr export model.apr -o - | python -c "import safetensors, sys; ..."
    """
    if fmt is None:
        fmt = "safetensors" if output == "-" or output.lower().endswith(".safetensors") else "hf"
    if fmt == "hf" and output == "-":
        raise InvalidArgument(output, "an HF folder cannot go to stdout (use --format safetensors)")
    if fmt == "safetensors" and max_shard_size is not None:
        raise InvalidArgument("--max-shard-size", "applies to --format hf only")
    if output == "-" and as_json:
        raise InvalidArgument("--json", "needs stdout, which -o - uses for the weights")
    if output == "-" and sys.stdout.isatty():
        raise InvalidArgument("-o -", "refusing to write binary safetensors to a terminal; redirect or pipe it")
    if no_verify:
        warn_unverified([src])
    with ByteProgress("exporting", quiet or as_json) as progress:
        if fmt == "hf":
            from apr_converters.apr_to_hf import export_apr_to_hf

            report = export_apr_to_hf(src, output, max_shard_size=max_shard_size, force=force, progress=progress,
                                      verify=not no_verify)
        else:
            from apr_converters.apr_to_hf import export_apr_to_safetensors

            target = sys.stdout.buffer if output == "-" else output
            report = export_apr_to_safetensors(src, target, force=force, progress=progress, verify=not no_verify)
            if output == "-":
                sys.stdout.buffer.flush()
    data = report_dict(report)
    if as_json:
        echo_json(data)
    elif not quiet:
        lines = [f"wrote {data['output']}: {data['tensor_count']} tensors, {human_bytes(data['total_size'])}"]
        lines += [f"  {name}" for name in data["files"]]
        lines += [f"  left out {name} (copy of the tied embedding)" for name in data["dropped"]]
        click.echo("\n".join(lines), err=output == "-")
