"""How commands that read either kind of input tell an .apr file from an HF checkpoint."""

from __future__ import annotations

import os


def is_apr_input(path: str) -> bool:
    """True unless `path` is a folder or a .safetensors file (those are read as HF checkpoints)."""
    return not (os.path.isdir(path) or path.lower().endswith(".safetensors"))
