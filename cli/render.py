"""Shared output helpers for every command: JSON on stdout, tabulate tables, human sizes, safe names,
byte progress bars, library reports as data."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import click
from tabulate import tabulate

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def echo_json(obj: Any) -> None:
    """Print `obj` as indented JSON on stdout, keys in insertion order, non-ASCII kept."""
    click.echo(json.dumps(obj, ensure_ascii=False, indent=2))


def escape(text: object) -> str:
    """`text` with control and other non-printable characters shown as escapes (\\x1b, \\n, \\u202e).

    Names in a file come from whoever wrote it; printed raw they could drive the terminal.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def table(rows: Iterable[Sequence[Any]], headers: Sequence[str] = (), tablefmt: str = "simple") -> str:
    """A text table; every string cell is escaped, columns of numbers are right-aligned.

    Strings are never parsed as numbers (a tensor named "1e5" stays "1e5").
    """
    safe = [[escape(cell) if isinstance(cell, str) else cell for cell in row] for row in rows]
    width = max((len(row) for row in safe), default=len(headers))
    text_columns = [i for i in range(width) if any(i < len(row) and isinstance(row[i], str) for row in safe)]
    return tabulate(safe, headers=list(headers), tablefmt=tablefmt, disable_numparse=text_columns or False)


def human_bytes(n: int) -> str:
    """Binary size: 512 B, 226.4 KiB, 1.0 GiB."""
    return f"{n} B" if abs(n) < 1024 else _scaled(n / 1024, 1024, ("KiB", "MiB", "GiB", "TiB", "PiB"), " ")


def human_count(n: int) -> str:
    """Short count as model cards write it: 300, 115.9K, 494.0M, 7.6B."""
    return str(n) if abs(n) < 1000 else _scaled(n / 1000, 1000, ("K", "M", "B", "T"), "")


def _scaled(value: float, base: int, units: tuple[str, ...], sep: str) -> str:
    for unit in units[:-1]:
        if round(abs(value), 1) < base:
            return f"{value:.1f}{sep}{unit}"
        value /= base
    return f"{value:.1f}{sep}{units[-1]}"


class ByteProgress:
    """A click progress bar over bytes on stderr, drawn only on a terminal without NO_COLOR, CI or --quiet."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label = label
        self.enabled = not quiet and sys.stderr.isatty() and not os.environ.get("NO_COLOR") and not os.environ.get("CI")
        self._bar = None

    def __call__(self, name: str, nbytes: int, total: int | None = None) -> None:
        if not self.enabled or total is None:
            return
        if self._bar is None:
            self._bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_eta=True)
            self._bar.__enter__()
        self._bar.update(nbytes)

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def report_dict(report: Any) -> dict[str, Any]:
    """A library report (dataclass with or without `to_dict`) as JSON-ready data."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    return asdict(report) if is_dataclass(report) else dict(report)
