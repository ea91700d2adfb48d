"""Where converters may write: refuse folders, the input itself, and existing files without --force."""

from __future__ import annotations

import os

from apr_format.errors import InvalidArgument, OutputExists


def check_destination(src: str | os.PathLike, dst: str | os.PathLike, force: bool) -> None:
    """Raise unless `dst` is a writable new file name (or an existing one with `force`).

    Raises:
        OutputExists, InvalidArgument, FileNotFoundError (missing parent folder).
    """
    if os.path.isdir(dst):
        raise OutputExists(dst, "is a folder; give a file name such as model.apr")
    if os.path.exists(dst):
        if os.path.exists(src) and os.path.samefile(src, dst):
            raise InvalidArgument(dst, "output would overwrite the input")
        if not force:
            raise OutputExists(dst, "already exists (use --force to overwrite)")
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise FileNotFoundError(2, "No such file or directory", parent)
