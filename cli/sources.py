"""How commands that read several kinds of input tell them apart (by content), and what they say of checksums."""

from __future__ import annotations

from apr_format.sniff import identify

NOT_VERIFIED = "not verified"  # header-only reads of an .apr: `apr validate` checks the footer CRC-32
NO_CHECKSUM = "none in this format"  # safetensors and GGUF carry no checksum


def input_kind(path: str) -> str:
    """"apr", "gguf" or "hf" (a .safetensors file or an HF folder), from the content; other files are
    read as .apr, whose reader names what they are.

    Raises:
        FileMissing, Unreadable: the path cannot be opened.
    """
    kind = identify(path)
    return {"gguf": "gguf", "safetensors": "hf", "hf-folder": "hf", "folder": "hf"}.get(kind, "apr")
