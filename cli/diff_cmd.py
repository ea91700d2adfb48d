"""`apr diff`: compare two checkpoints; exit 0 when identical, 1 when they differ."""

from __future__ import annotations

from typing import Any

import click

from .render import ByteProgress, echo_json, escape, table

EXIT_DIFFERENT = 1


@click.command("diff")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no output; only the exit status.")
@click.pass_context
def diff_cmd(ctx: click.Context, a: str, b: str, as_json: bool, quiet: bool) -> None:
    """Compare A and B (.apr, .safetensors or HF folders, any combination).

    Reports metadata differences, tensors only in A or B, dtype/shape changes, and for common
    tensors the max abs difference, relative L2 and byte identity. Exit 0 when identical, 1 if not.
    """
    from apr_converters.diff import diff_checkpoints

    with ByteProgress("comparing", quiet or as_json) as progress:
        result = diff_checkpoints(a, b, progress=progress)
    data = result.to_dict()
    if as_json:
        echo_json(data)
    elif not quiet:
        click.echo(render_diff(data))
    ctx.exit(0 if result.identical else EXIT_DIFFERENT)


def render_diff(data: dict[str, Any]) -> str:
    """Human report: what differs first, then the verdict."""
    kinds = data["kinds"]
    lines = [f"A: {escape(data['a'])} ({kinds[0]})", f"B: {escape(data['b'])} ({kinds[1]})"]
    meta = data["metadata"]
    if meta["differences"]:
        lines.append(f"metadata ({meta['compared']}): {len(meta['differences'])} differences")
        lines += [f"  {escape(d['key'])}: {escape(_value(d['a']))} -> {escape(_value(d['b']))}" for d in meta["differences"]]
    elif meta["compared"] != "none":
        lines.append(f"metadata ({meta['compared']}): same")
    if meta["ignored"]:
        lines.append(f"  (not counted: {', '.join(meta['ignored'])})")
    for key, label in (("only_in_a", "only in A"), ("only_in_b", "only in B")):
        if data[key]:
            lines.append(f"tensors {label} ({len(data[key])}):")
            lines += [f"  {escape(name)}" for name in data[key]]
    changed = [t for t in data["tensors"] if not t["identical"]]
    summary = data["tensor_summary"]
    lines.append(f"common tensors: {summary['common']}, identical {summary['identical']}, different {summary['different']}")
    if changed:
        rows = [[t["name"], _pair(t["dtype"]), _pair([_shape(s) for s in t["shape"]]),
                 _num(t["max_abs_diff"]), _num(t["rel_l2"])] for t in changed]
        lines.append(table(rows, headers=["tensor", "dtype", "shape", "max abs diff", "rel L2"]))
    lines += [f"note: {escape(note)}" for note in data["notes"]]
    verdict = "identical" if data["identical"] else f"different ({data['difference_count']} differences)"
    lines.append(f"result: {verdict}")
    return "\n".join(lines)


def _pair(values: list[Any]) -> str:
    return str(values[0]) if values[0] == values[1] else f"{values[0]} -> {values[1]}"


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _num(value: float | str | None) -> str:
    """A figure for the table; JSON spells non-finite values as strings ("inf")."""
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3g}"


def _value(value: Any) -> str:
    return "(absent)" if value is None else str(value)
