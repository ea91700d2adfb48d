"""`apr export`: an .apr file -> an HF folder (config, shards, index, tokenizer) or one safetensors file."""

from __future__ import annotations

import sys

import click

from apr_format.errors import InvalidArgument

from .render import ByteProgress, echo_json, human_bytes, report_dict


@click.command("export")
@click.argument("src", metavar="MODEL.apr")
@click.option("-o", "--output", required=True, metavar="OUT",
              help="Output folder (hf), or file / '-' for stdout (safetensors).")
@click.option("--format", "fmt", type=click.Choice(["hf", "safetensors"]), default=None,
              help="hf folder (default) or one safetensors file (default when OUT ends in .safetensors or is -).")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Split weights into shards of at most SIZE (e.g. 2GB, 500MB). "
                   "Default: the source's own split when known, else 5GB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export_cmd(
    src: str, output: str, fmt: str | None, max_shard_size: str | None, force: bool, quiet: bool, as_json: bool
) -> None:
    """Export MODEL.apr for transformers: `from_pretrained(OUT)` loads the folder.

    aprender's lm_head copy of a tied model is left out, so HF -> APR -> HF gives back the
    source files.
    """
    if fmt is None:
        fmt = "safetensors" if output == "-" or output.lower().endswith(".safetensors") else "hf"
    if fmt == "hf" and output == "-":
        raise InvalidArgument(output, "an HF folder cannot go to stdout (use --format safetensors)")
    if fmt == "safetensors" and max_shard_size is not None:
        raise InvalidArgument(output, "--max-shard-size applies to --format hf only")
    if output == "-" and as_json:
        raise InvalidArgument(output, "--json needs stdout, which -o - uses for the weights")
    with ByteProgress("exporting", quiet or as_json) as progress:
        if fmt == "hf":
            from apr_converters.apr_to_hf import export_apr_to_hf

            report = export_apr_to_hf(src, output, max_shard_size=max_shard_size, force=force, progress=progress)
        else:
            from apr_converters.apr_to_hf import export_apr_to_safetensors

            target = sys.stdout.buffer if output == "-" else output
            report = export_apr_to_safetensors(src, target, force=force, progress=progress)
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
