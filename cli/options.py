"""Options every command spells the same way: -o/--output (old spellings as hidden aliases), --no-verify, warnings."""

from __future__ import annotations

from typing import Any

import click

from apr_format.errors import AprError
from apr_format.sniff import identify

from .render import escape


class AliasedOption(click.Option):
    """An option whose extra spellings (`hidden_aliases`) are accepted but left out of the help."""

    def __init__(self, *args: Any, hidden_aliases: tuple[str, ...] = (), **kwargs: Any) -> None:
        decls, *rest = args if args else ([],)
        super().__init__([*decls, *hidden_aliases], *rest, **kwargs)
        self.hidden_aliases = tuple(hidden_aliases)

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown = [o for o in self.opts if o not in self.hidden_aliases]
        saved, self.opts = self.opts, shown
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = saved


def output_option(help_text: str, metavar: str, *, required: bool = True, dest: str = "output",
                  hidden_aliases: tuple[str, ...] = ()):
    """`-o/--output` as every command spells it (`hidden_aliases`: the command's old spellings)."""
    return click.option("-o", "--output", dest, cls=AliasedOption, hidden_aliases=hidden_aliases,
                        required=required, metavar=metavar, help=help_text)


def no_verify_option():
    """`--no-verify`: skip the footer CRC-32 check of an .apr input (said loudly when used)."""
    return click.option("--no-verify", "no_verify", is_flag=True,
                        help="Do not check the .apr input's footer CRC-32 (a corrupt file then passes; "
                             "a warning says so).")


def warn(message: str) -> None:
    """One warning line on stderr: `apr: warning: ...`."""
    click.echo(f"apr: warning: {escape(message)}", err=True)


def warn_unverified(paths: list[str]) -> None:
    """Say that --no-verify leaves the given .apr inputs unchecked (other inputs have no footer)."""
    for path in filter(_is_apr, paths):
        warn(f"{path}: --no-verify: footer checksum not checked; corrupt weights would pass unnoticed")


def _is_apr(path: str) -> bool:
    try:
        return identify(path) == "apr"
    except AprError:
        return False
