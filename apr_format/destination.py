"""Where apr may write: refuse folders given as files, the input itself, and existing outputs without --force."""

from __future__ import annotations

import os

from .errors import InvalidArgument, OutputExists


def check_output_file(
    dst: str | os.PathLike, force: bool, *, src: str | os.PathLike | None = None, example: str = "model.apr"
) -> None:
    """Raise unless `dst` is a writable new file name (or an existing one with `force`).

    `src` is the input, which the output must never overwrite; `example` the file name the
    message suggests when `dst` is a folder.

    Raises:
        OutputExists, InvalidArgument, FileNotFoundError (missing parent folder).
    """
    if os.path.isdir(dst):
        raise OutputExists(dst, f"is a folder; give a file name such as {example}")
    if os.path.exists(dst):
        if src is not None and os.path.exists(src) and os.path.samefile(src, dst):
            raise InvalidArgument(dst, "output would overwrite the input")
        if not force:
            raise OutputExists(dst, "already exists (use --force to overwrite)")
    _check_parent(dst)


def check_output_folder(out_dir: str | os.PathLike, force: bool) -> None:
    """Raise unless `out_dir` is absent or empty (or any folder with `force`).

    Raises:
        OutputExists, FileNotFoundError (missing parent folder).
    """
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            raise OutputExists(out_dir, "exists and is not a folder")
        if os.listdir(out_dir) and not force:
            raise OutputExists(out_dir, "already exists and is not empty (use --force to replace it)")
    _check_parent(out_dir)


def _check_parent(path: str | os.PathLike) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(2, "No such file or directory", parent)
