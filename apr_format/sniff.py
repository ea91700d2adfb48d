"""What a file is, from its first bytes (not its name): apr, gguf, safetensors, JSON, text, pickle..."""

from __future__ import annotations

import os

from .constants import MAGIC, MAGIC_V1
from .errors import from_os_error

SNIFF_BYTES = 4096
_BY_SUFFIX = {".apr": "apr", ".gguf": "gguf", ".safetensors": "safetensors"}
# kind -> how a message names it
KINDS = {
    "apr": "an .apr file",
    "apr-v1": "an APR v1 file",
    "gguf": "a GGUF file",
    "safetensors": "a safetensors file",
    "hf-folder": "an HF model folder",
    "folder": "a folder",
    "json": "a JSON file",
    "text": "a text file",
    "pytorch-zip": "a zip archive (a PyTorch .bin/.pt checkpoint?)",
    "pickle": "a Python pickle (a PyTorch .bin checkpoint?)",
    "empty": "an empty file",
    "binary": "a binary file of unknown format",
}


def identify(path: str | os.PathLike) -> str:
    """The kind of file (a key of KINDS) at `path`, judged by its content (by its name only when the
    content is not recognisable, so that a damaged file reaches the parser that explains the damage).

    Raises:
        FileMissing, Unreadable: the path does not exist or cannot be read.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        has_weights = any(name.endswith(".safetensors") for name in os.listdir(path))
        return "hf-folder" if has_weights or os.path.isfile(os.path.join(path, "config.json")) else "folder"
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        raise from_os_error(path, exc) from None
    kind = identify_bytes(head)
    if kind == "binary":  # damaged beyond recognition: the name picks the parser that says what is wrong
        kind = _BY_SUFFIX.get(os.path.splitext(path)[1].lower(), kind)
    return kind


def identify_bytes(head: bytes) -> str:
    """The kind of file whose first bytes are `head`."""
    if not head:
        return "empty"
    if head[:4] == MAGIC:
        return "apr"
    if head[:4] == MAGIC_V1:
        return "apr-v1"
    if head[:4] == b"GGUF":
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{" and head[:8] != b"        ":  # u64 header length, then JSON
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "pytorch-zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if b"\0" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 3:  # a character cut at the end of the sample is fine
                return "binary"
            text = head[: exc.start].decode("utf-8")
        return "json" if text.lstrip()[:1] in ("{", "[") else "text"
    return "binary"


def describe(kind: str) -> str:
    """How messages name a kind: "a safetensors file"."""
    return KINDS.get(kind, KINDS["binary"])
