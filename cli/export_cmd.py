"""`apr export`: an .apr file -> an HF folder (config, shards, index, tokenizer), one safetensors file or a GGUF file."""

from __future__ import annotations

import sys

import click

from apr_format.errors import InvalidArgument

from .render import ByteProgress, echo_json, human_bytes, report_dict


@click.command("export")
@click.argument("src", metavar="MODEL.apr")
@click.option("-o", "--output", required=True, metavar="OUT",
              help="Output folder (hf), file or '-' for stdout (safetensors), or .gguf file (gguf).")
@click.option("--format", "fmt", type=click.Choice(["hf", "safetensors", "gguf"]), default=None,
              help="hf folder (default), one safetensors file (default when OUT ends in .safetensors or is -) "
                   "or a GGUF file for llama.cpp (default when OUT ends in .gguf).")
@click.option("--outtype", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default=None,
              help="gguf only: GGML type of the 2-D tensors; auto keeps each tensor's float type (lossless). "
                   "Norms and biases are F32 always.  [default: auto]")
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Split weights into shards of at most SIZE (e.g. 2GB, 500MB). "
                   "Default: the source's own split when known, else 5GB.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
def export_cmd(
    src: str, output: str, fmt: str | None, outtype: str | None, max_shard_size: str | None, force: bool,
    quiet: bool, as_json: bool,
) -> None:
    """Export MODEL.apr for transformers (`from_pretrained(OUT)` loads the folder) or llama.cpp (GGUF).

    aprender's lm_head copy of a tied model is left out, so HF -> APR -> HF gives back the
    source files. GGUF: llama / qwen2 models, with llama.cpp's tensor names, q/k row order,
    architecture keys and the carried tokenizer; q4 / q8 tensors are dequantized (listed).

    Example: apr export model.apr -o model.gguf --outtype q8_0
    """
    if fmt is None:
        lower = output.lower()
        fmt = "safetensors" if output == "-" or lower.endswith(".safetensors") else "gguf" if lower.endswith(".gguf") else "hf"
    if fmt in ("hf", "gguf") and output == "-":
        raise InvalidArgument(output, f"--format {fmt} cannot go to stdout (use --format safetensors)")
    if fmt != "hf" and max_shard_size is not None:
        raise InvalidArgument(output, "--max-shard-size applies to --format hf only")
    if fmt != "gguf" and outtype is not None:
        raise InvalidArgument(output, "--outtype applies to --format gguf only")
    if output == "-" and as_json:
        raise InvalidArgument(output, "--json needs stdout, which -o - uses for the weights")
    with ByteProgress("exporting", quiet or as_json) as progress:
        if fmt == "gguf":
            from apr_converters.apr_to_gguf import export_apr_to_gguf

            report = export_apr_to_gguf(src, output, outtype=outtype or "auto", force=force, progress=progress)
        elif fmt == "hf":
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
    elif not quiet and fmt == "gguf":
        click.echo(render_gguf(data))
    elif not quiet:
        lines = [f"wrote {data['output']}: {data['tensor_count']} tensors, {human_bytes(data['total_size'])}"]
        lines += [f"  {name}" for name in data["files"]]
        lines += [f"  left out {name} (copy of the tied embedding)" for name in data["dropped"]]
        click.echo("\n".join(lines), err=output == "-")


def render_gguf(data: dict) -> str:
    """Human summary of a GGUF export: what was written, and every place values changed or were left out."""
    types = ", ".join(f"{k}: {v}" for k, v in data["types"].items())
    tokenizer = f"tokenizer gpt2 (pre {data['tokenizer_pre']})" if data["tokenizer_pre"] else "no tokenizer"
    lines = [
        f"wrote {data['output']} ({human_bytes(data['bytes_written'])})",
        f"  {data['architecture']}, {data['tensor_count']} tensors ({types}), outtype {data['outtype']}; {tokenizer}",
    ]
    lines += [f"  left out {name} (copy of the tied embedding; llama.cpp ties by its absence)" for name in data["dropped"]]
    if data["dequantized"]:
        shown = ", ".join(data["dequantized"][:3]) + (f" and {len(data['dequantized']) - 3} more" if len(data["dequantized"]) > 3 else "")
        lines.append(f"  note: dequantized {len(data['dequantized'])} quantized tensors (GGUF has no APR q4/q8 blocks): {shown}")
    lines += [f"  warning: {warning}" for warning in data["warnings"]]
    return "\n".join(lines)
