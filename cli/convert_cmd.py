"""`apr convert`: an HF checkpoint (folder, shards, bare .safetensors), a GGUF or an .apr file -> .apr."""

from __future__ import annotations

from typing import Any

import click

from apr_format.errors import InvalidArgument
from apr_format.sniff import describe, identify

from .options import no_verify_option, output_option, warn_unverified
from .render import ByteProgress, echo_json, escape, human_bytes, human_count, report_dict
from .sources import local_path


@click.command("convert")
@click.argument("src", metavar="SRC")
@output_option("Output .apr file.", "FILE.apr")
@click.option("--dtype", type=click.Choice(["f32", "f16", "bf16"]), default=None,
              help="Cast float tensors to this dtype (smaller, rounded).",
              show_default="lossless: source dtypes kept, GGUF quantized blocks dequantized to f32")
@click.option("--force", is_flag=True, help="Overwrite FILE.apr if it exists.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="config.json for a bare .safetensors file (or to override the folder's).")
@click.option("--lm-head-copy/--no-lm-head-copy", "lm_head_copy", default=None,
              help="Tied models: store lm_head.weight as a copy of the embedding (aprender wants it), or not.",
              show_default="added for HF/GGUF input, as it is for .apr input")
@click.option("--keep-quant", is_flag=True, help="GGUF only: keep Q4_K / Q6_K blocks as APR q4_k / q6_k.")
@click.option("--compress", type=click.Choice(["zstd", "none"]), default=None,
              help="Compress tensor data; zstd is our extension (aprender cannot read it).",
              show_default="none; .apr input: as it is")
@click.option("--quantize", type=click.Choice(["q8", "q4"]), default=None,
              help="Pack weight matrices as aprender's q8 (one f32 scale per tensor) or q4 (blocks of 32, "
                   "f16 scales); norms, biases and tensors under 1024 values stay float. Prints the error.")
@no_verify_option()
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def convert_cmd(
    src: str, output: str, dtype: str | None, force: bool, quiet: bool, config_path: str | None,
    lm_head_copy: bool | None, keep_quant: bool, compress: str | None, quantize: str | None, no_verify: bool,
    as_json: bool,
) -> None:
    """Convert SRC (an HF model folder, a .safetensors, GGUF or .apr file, or hf://ORG/NAME[@REVISION]) to an .apr file.

    The input is recognised by its content, whatever its name. Conversion is lossless unless
    --dtype or --quantize asks otherwise: HF tensors keep their dtype (bf16 bytes are copied
    unchanged), GGUF F32/F16/BF16 tensors are kept and quantized blocks dequantized to f32. qwen2
    and llama checkpoints are checked tensor by tensor against the config. An .apr input is
    re-encoded (dtype, compression, lm_head copy) after its footer CRC-32 is checked. `apr import`
    is the same command (aprender's name for it).

    \b
    Examples:
      apr convert Qwen2.5-0.5B/ -o qwen.apr
      apr convert SmolLM2-135M.Q8_0.gguf -o smol.apr --dtype bf16
      apr convert ./SmolLM2-135M -o smollm2-q4.apr --quantize q4
      apr convert model.apr -o model.zst.apr --compress zstd
    """
    src = local_path(src)
    kind = identify(src)
    compression = {"zstd": "zstd", "none": None, None: None}[compress]
    with ByteProgress("converting", quiet or as_json) as progress:
        if kind == "gguf":
            _refuse_flags(src, "GGUF", config=config_path, compress=compress, no_verify=no_verify)
            from apr_converters.gguf_to_apr import convert_gguf

            report = convert_gguf(
                src, output, dtype=dtype, keep_quant=keep_quant, force=force,
                lm_head_copy=lm_head_copy is not False, quantize=quantize, progress=progress,
            )
        elif kind == "apr":
            _refuse_flags(src, ".apr", config=config_path, keep_quant=keep_quant, quantize=quantize)
            from apr_converters.apr_to_apr import KEEP, reencode_apr

            if no_verify:
                warn_unverified([src])
            report = reencode_apr(
                src, output, dtype=dtype, compression=KEEP if compress is None else compression,
                lm_head_copy=lm_head_copy, force=force, progress=progress, verify=not no_verify,
            )
        elif kind in ("safetensors", "hf-folder"):
            _refuse_flags(src, "HF", keep_quant=keep_quant, no_verify=no_verify)
            from apr_converters.hf_to_apr import convert_hf_to_apr

            report = convert_hf_to_apr(
                src, output, dtype=dtype, force=force, lm_head_copy=lm_head_copy is not False,
                config_path=config_path, compression=compression, quantize=quantize, progress=progress,
            )
        else:
            raise InvalidArgument(src, f"is {describe(kind)}; apr convert reads HF model folders, .safetensors, "
                                       "GGUF and .apr files")
    data = report_dict(report)
    if as_json:
        echo_json(data)
    elif not quiet:
        click.echo(render_report(data))
    else:  # -q drops the report, never a warning
        for warning in data.get("warnings") or []:
            click.echo(f"apr: warning: {escape(warning)}", err=True)


def _refuse_flags(src: str, kind: str, **given: object) -> None:
    """Flags that mean nothing for this kind of input are refused, not ignored."""
    for name, value in given.items():
        if value:
            flag = "--" + name.replace("_", "-")
            raise InvalidArgument(flag, f"does not apply to {kind} input ({src})")


def render_report(data: dict[str, Any]) -> str:
    """Human summary of a conversion report."""
    arch = data.get("architecture") or "unknown architecture"
    checked = (f"checked against the {data['family']} table" if data.get("family")
               else {True: "re-encoded; the source's footer CRC-32 matched",
                     False: "re-encoded; the source's footer CRC-32 was NOT checked (--no-verify)"}.get(
                   data.get("source_verified"), "not validated"))
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
    for choice in data.get("dtype_choices") or []:
        lines.append(f"  {choice['source_type']}: {choice['count']} tensors -> {choice['output']}, {choice['reason']}")
    for warning in data.get("warnings") or []:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)
