"""Import hygiene: apr_format stays light, and `apr inspect/tensors/validate` on .apr never load torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apr_testing import GOLDEN

HEAVY = ("torch", "zstandard", "apr_converters", "apr_trainer", "transformers", "safetensors")


def _fresh_python(code: str) -> list[str]:
    """Heavy modules loaded by `code` in a clean interpreter."""
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _imported_by_cli(*args: str) -> set[str]:
    """Top-level packages the real CLI entry point imports, from `python -X importtime` (stderr)."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([sys.executable, "-m", "apr_cli.main", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in proc.stderr.splitlines() if line.startswith("import time:") and "|" in line}


def test_import_apr_format_is_light():
    assert _fresh_python("import apr_format, apr_format.validate") == []


def test_reading_and_validating_needs_neither_torch_nor_zstandard():
    code = (f"from apr_format import open_apr\nfrom apr_format.validate import validate_file\n"
            f"f = open_apr({str(GOLDEN / 'tiny-qwen2.apr')!r}); f.to_float32(f.keys()[0]); f.verify()\n"
            f"validate_file({str(GOLDEN / 'all-dtypes.apr')!r})")
    assert _fresh_python(code) == []


@pytest.mark.parametrize("command", [["inspect", "--json"], ["inspect"], ["tensors"], ["validate", "--json"]])
def test_cli_on_apr_does_not_import_torch_or_converters(command):
    imported = _imported_by_cli(command[0], str(GOLDEN / "tiny-llama.apr"), *command[1:])
    assert {"apr_cli", "apr_format", "numpy", "click"} <= imported  # the probe sees real imports
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_probe_detects_converters_for_safetensors_input(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "m.safetensors"))
    assert "apr_converters" in _imported_by_cli("inspect", str(tmp_path / "m.safetensors"), "--json")
