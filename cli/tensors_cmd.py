"""`apr tensors`: one row per tensor (name, dtype, shape, bytes, offset), optionally filtered by a glob."""

from __future__ import annotations

import fnmatch
import os
import re
from typing import Any

import click

from apr_format import Flag, open_apr

from .main import EXIT_CHECK_FAILED
from .render import echo_json, escape, table
from .sources import NO_CHECKSUM, NOT_VERIFIED, input_kind, local_path

_DIGITS = re.compile(r"([0-9]+)")


@click.command("tensors")
@click.argument("path", metavar="FILE")
@click.option("--filter", "pattern", metavar="GLOB",
              help="Only names matching GLOB (fnmatch, case-sensitive); exit 1 when none does.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def tensors_cmd(ctx: click.Context, path: str, pattern: str | None, as_json: bool) -> None:
    """List the tensors of FILE (.apr, .safetensors, GGUF, HF folder or hf://ORG/NAME[@REVISION]), layers in numeric order.

    `offset` is the byte offset in the file. Reads the index only: an .apr's footer checksum is
    not verified (`apr validate` does that).

    \b
    Examples:
      apr tensors model.apr --filter '*.layers.0.*'
      apr tensors model.gguf --json
    """
    path = local_path(path)
    kind = input_kind(path)
    listing = {"apr": list_apr, "gguf": list_gguf, "hf": list_hf}[kind](path)
    listing["tensors"].sort(key=lambda t: natural_key(t["name"]))
    if pattern is not None:
        listing["tensors"] = [t for t in listing["tensors"] if fnmatch.fnmatchcase(t["name"], pattern)]
        listing["count"] = len(listing["tensors"])
        if not listing["tensors"]:
            click.echo(f"apr: {escape(path)}: no tensor name matches {escape(pattern)!s} "
                       "(the filter is a case-sensitive glob such as '*.layers.0.*')", err=True)
            if as_json:
                echo_json(listing)
            ctx.exit(EXIT_CHECK_FAILED)
    if as_json:
        echo_json(listing)
        return
    columns = list(listing["tensors"][0]) if listing["tensors"] else ["name", "dtype", "shape", "nbytes", "offset"]
    rows = [[_cell(t[c]) for c in columns] for t in listing["tensors"]]
    click.echo(table(rows, columns))
    total = sum(t["nbytes"] for t in listing["tensors"])
    click.echo(f"\n{listing['count']:,} tensors, {total:,} bytes")


def list_apr(path: str) -> dict[str, Any]:
    """Every index entry of an .apr; `offset` is absolute (data_offset + the index's relative offset)."""
    with open_apr(path, use_mmap=False) as apr:
        compressed = bool(apr.header.flags & Flag.ZSTD)
        tensors = []
        for t in apr.tensors():
            row = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
            if compressed:
                row["stored"] = t.size
            row["offset"] = apr.header.data_offset + t.offset
            tensors.append(row)
        return {"format": "apr", "path": path, "data_offset": apr.header.data_offset,
                "checksum": NOT_VERIFIED, "trailing_bytes": apr.trailing_bytes,
                "count": len(tensors), "tensors": tensors}


def list_hf(path: str) -> dict[str, Any]:
    """Every tensor of a .safetensors file or HF folder, with its file and byte offset in that file."""
    from apr_converters.hf_source import open_hf_source

    with open_hf_source(path) as source:
        tensors = [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "offset": t.start,
             "file": os.path.basename(t.file)}
            for t in source.tensors.values()
        ]
    return {"format": "safetensors", "path": path, "checksum": NO_CHECKSUM, "count": len(tensors), "tensors": tensors}


def list_gguf(path: str) -> dict[str, Any]:
    """Every tensor of a GGUF file: GGML type, row-major shape, bytes and absolute offset."""
    from apr_converters.gguf_source import read_gguf

    _, tensors = read_gguf(path)
    rows = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "offset": t.offset}
            for t in tensors]
    return {"format": "gguf", "path": path, "checksum": NO_CHECKSUM, "count": len(rows), "tensors": rows}


def natural_key(name: str) -> list[Any]:
    """Sort key putting layer 2 before layer 10: digit runs compare as numbers."""
    # split() with a group puts the digit runs at the odd positions
    return [(0, int(part), "") if i % 2 else (1, 0, part) for i, part in enumerate(_DIGITS.split(name))]


def _cell(value: Any) -> Any:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else value
