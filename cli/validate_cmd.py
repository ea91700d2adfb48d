"""`apr validate`: every structural check, footer CRC, alignment and a NaN/Inf scan; exit 1 on failures."""

from __future__ import annotations

import click

from apr_format.errors import InvalidArgument
from apr_format.sniff import identify
from apr_format.validate import validate_file

from .main import EXIT_CHECK_FAILED
from .render import echo_json, escape, table


@click.command("validate")
@click.argument("path", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def validate_cmd(path: str, as_json: bool) -> None:
    """Check FILE (.apr, .safetensors or an HF folder) thoroughly: structure, sizes, bounds, overlaps,
    checksums (.apr), the shard index (HF folders) and a NaN/Inf scan of every float tensor.

    Exit 0 when every check passes, 1 when any fails, 2 if it cannot be read.

    \b
    Examples:
      apr validate model.apr
      apr validate Qwen2.5-0.5B/ --json
    """
    kind = identify(path)
    if kind == "folder":
        raise InvalidArgument(path, "is a folder without config.json or .safetensors files; apr validate checks "
                                    ".apr and safetensors files and HF folders")
    if kind in ("safetensors", "hf-folder"):
        from apr_converters.validate_hf import validate_hf

        report = validate_hf(path)
    else:  # its magic check names what another kind of file is
        report = validate_file(path)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(table([(c.name, c.status, c.detail) for c in report.checks], ("check", "status", "detail")))
        if report.nonfinite:
            click.echo()
            rows = [(t.name, t.dtype, t.nan, t.inf) for t in report.nonfinite]
            click.echo(table(rows, ("tensor", "dtype", "NaN", "Inf")))
        click.echo()
        if report.ok:
            click.echo(f"{escape(path)}: valid ({len(report.checks)} checks passed, {report.total_tensors} tensors)")
        else:
            click.echo(f"{escape(path)}: INVALID ({report.failed} of {len(report.checks)} checks failed)")
    if not report.ok:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)
