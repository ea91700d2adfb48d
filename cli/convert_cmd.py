"""`apr convert`: an HF checkpoint (folder, shards, bare .safetensors) or a GGUF file -> .apr."""

from __future__ import annotations

from typing import Any

import click

from apr_format.errors import InvalidArgument

from .render import ByteProgress, echo_json, human_bytes, human_count, report_dict


@click.command("convert")
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", required=True, metavar="FILE.apr", help="Output .apr file.")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default=None,
              help="Cast float tensors (default: keep the source dtype; GGUF quants dequantize to bf16).")
@click.option("--force", is_flag=True, help="Overwrite FILE.apr if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="config.json for a bare .safetensors file (or to override the folder's).")
@click.option("--no-lm-head-copy", is_flag=True,
              help="Tied models: do not store lm_head.weight as a copy of the embedding (aprender wants it).")
@click.option("--keep-quant", is_flag=True, help="GGUF only: keep Q4_K / Q6_K blocks as APR q4_k / q6_k.")
@click.option("--compress", type=click.Choice(["zstd"]), default=None,
              help="Our zstd extension (aprender cannot read it); default uncompressed.")
@click.option("--quantize", type=click.Choice(["q8", "q4"]), default=None,
              help="Pack weight matrices as aprender's q8 (one f32 scale per tensor) or q4 (blocks of 32, "
                   "f16 scales); norms, biases and tensors under 1024 values stay float. Prints the error.")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def convert_cmd(
    src: str, output: str, dtype: str | None, force: bool, quiet: bool, config_path: str | None,
    no_lm_head_copy: bool, keep_quant: bool, compress: str | None, quantize: str | None, as_json: bool,
) -> None:
    """Convert SRC (an HF model folder, a .safetensors file or a .gguf file) to an .apr file.

    HF tensors keep their names, shapes and dtype (bf16 bytes are copied unchanged). qwen2 and
    llama checkpoints are checked tensor by tensor against the config; other architectures are
    converted as they are. `apr import` is the same command (aprender's name for it).

    Example: apr convert ./SmolLM2-135M -o smollm2-q4.apr --quantize q4
    """
    with ByteProgress("converting", quiet or as_json) as progress:
        if src.lower().endswith(".gguf"):
            for flag, given in (("--config", config_path), ("--compress", compress)):
                if given:
                    raise InvalidArgument(src, f"{flag} does not apply to GGUF input")
            from apr_converters.gguf_to_apr import convert_gguf

            report = convert_gguf(
                src, output, dtype=dtype or "bf16", keep_quant=keep_quant, force=force,
                lm_head_copy=not no_lm_head_copy, quantize=quantize, progress=progress,
            )
        else:
            if keep_quant:
                raise InvalidArgument(src, "--keep-quant applies to GGUF input only")
            from apr_converters.hf_to_apr import convert_hf_to_apr

            report = convert_hf_to_apr(
                src, output, dtype=dtype, force=force, lm_head_copy=not no_lm_head_copy,
                config_path=config_path, compression=compress, quantize=quantize, progress=progress,
            )
    data = report_dict(report)
    if as_json:
        echo_json(data)
    elif not quiet:
        click.echo(render_report(data))


def render_report(data: dict[str, Any]) -> str:
    """Human summary of a conversion report."""
    arch = data.get("architecture") or "unknown architecture"
    checked = f"checked against the {data['family']} table" if data.get("family") else "not validated"
    dtypes = ", ".join(f"{k}: {v}" for k, v in sorted((data.get("dtypes") or {}).items()))
    lines = [
        f"wrote {data['output']} ({human_bytes(data['bytes_written'])})",
        f"  {arch}, {human_count(data['param_count'])} parameters, {data['tensor_count']} tensors ({dtypes}); {checked}",
    ]
    if data.get("lm_head_copy"):
        lines.append("  tied embeddings: lm_head.weight stored as a copy of model.embed_tokens.weight")
    if data.get("carried_files"):
        lines.append(f"  carried: {', '.join(data['carried_files'])}")
    if data.get("extra_tensors"):
        extra = data["extra_tensors"]
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        lines.append(f"  kept {len(extra)} tensors the {data['family']} table does not know: {shown}")
    quant = data.get("quantization")
    if quant:
        worst = quant["worst_tensor"] or {}
        lines.append(
            f"  quantized {len(quant['quantized'])} tensors to {quant['kind']} "
            f"(max |error| {quant['max_abs_error']:.3g}, relative L2 error {quant['rel_l2_error']:.3g}; "
            f"worst {worst.get('name')} at {worst.get('rel_l2', 0):.3g}); "
            f"kept {len(quant['kept_float'])} in float (norms, biases, tensors under 1024 values)"
        )
    for warning in data.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)
