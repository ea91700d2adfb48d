"""How commands tell their inputs apart (by content), resolve hf:// ids, and what they say of checksums."""

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


HUB_PREFIX = "hf://"  # also converters.hub.HUB_PREFIX; repeated so .apr paths never import the converters


def local_path(path: str) -> str:
    """`path` unchanged, or the local snapshot folder of an `hf://ORG/NAME[@REVISION]` id."""
    if not path.startswith(HUB_PREFIX):
        return path
    from apr_converters.hub import download_model

    return download_model(path)
