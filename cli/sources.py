"""Model arguments: hf:// ids resolved to a local folder, and an .apr file told from an HF checkpoint."""

from __future__ import annotations

import os


def is_apr_input(path: str) -> bool:
    """True unless `path` is a folder or a .safetensors file (those are read as HF checkpoints)."""
    return not (os.path.isdir(path) or path.lower().endswith(".safetensors"))


HUB_PREFIX = "hf://"  # also converters.hub.HUB_PREFIX; repeated so .apr paths never import the converters


def local_path(path: str) -> str:
    """`path` unchanged, or the local snapshot folder of an `hf://ORG/NAME[@REVISION]` id."""
    if not path.startswith(HUB_PREFIX):
        return path
    from apr_converters.hub import download_model

    return download_model(path)
