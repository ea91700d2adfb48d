"""`apr tensors`: one row per tensor (name, dtype, shape, bytes, offset), optionally filtered by a glob."""

from __future__ import annotations

import fnmatch
import os
from typing import Any

import click

from apr_format import Flag, open_apr

from .render import echo_json, table
from .sources import is_apr_input


@click.command("tensors")
@click.argument("path", metavar="FILE")
@click.option("--filter", "pattern", metavar="GLOB", help="Only names matching GLOB (fnmatch, case-sensitive).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def tensors_cmd(path: str, pattern: str | None, as_json: bool) -> None:
    """List the tensors of FILE (.apr, .safetensors or HF folder). `offset` is the byte offset in the file."""
    listing = list_apr(path) if is_apr_input(path) else list_hf(path)
    if pattern is not None:
        listing["tensors"] = [t for t in listing["tensors"] if fnmatch.fnmatchcase(t["name"], pattern)]
        listing["count"] = len(listing["tensors"])
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
    return {"format": "safetensors", "path": path, "count": len(tensors), "tensors": tensors}


def _cell(value: Any) -> Any:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else value
