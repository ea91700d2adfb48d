"""No code execution from files: no pickle (or any loader that can run code) in the package sources, and
nothing a run or an export writes is a pickle. Optimizer and RNG state live in safetensors; weights in .apr."""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from apr_format.safetensors_reader import parse_header
from apr_format.validate import validate_file
from apr_trainer.data import write_token_file

from apr_testing import ROOT, run_apr


PACKAGES = ("apr_format", "cli", "converters", "trainer")
# Modules whose loaders build arbitrary objects (and so run code) from bytes.
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
PICKLE_PROTOCOLS = {bytes([0x80, p]) for p in range(2, 6)}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else _dotted(kw.value)
    return None


def unsafe_uses(source: str) -> list[str]:
    """Every construct in `source` that can execute code hidden in a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            tail = name.split(".")[-1]
            if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
            elif name.endswith(("torch.save", "torch.jit.load", "read_pickle")) or tail in ("unsafe_load", "full_load"):
                found.append(f"{where}: {name}()")
            elif name.endswith("torch.load") and _keyword(node, "weights_only") is not True:
                found.append(f"{where}: {name}() without weights_only=True")
            elif tail == "load" and name.split(".")[0] in ("np", "numpy") and _keyword(node, "allow_pickle") is True:
                found.append(f"{where}: {name}(allow_pickle=True)")
            elif name in ("yaml.load", "yaml.load_all") and "Safe" not in str(_keyword(node, "Loader")):
                found.append(f"{where}: {name}() without a SafeLoader")
    return found


def test_the_scanner_finds_every_unsafe_construct():
    bad = """
import pickle
from cloudpickle import loads
import torch, numpy as np, yaml
torch.save(state, "x.pt")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
np.load("x.npy", allow_pickle=True)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
eval(text)
exec(code)
"""
    assert len(unsafe_uses(bad)) == 10, unsafe_uses(bad)
    fine = """
import torch, numpy as np, yaml
torch.load("x.pt", weights_only=True)
np.load("x.npy")
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
model.eval()
"""
    assert unsafe_uses(fine) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_package_sources_never_unpickle(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    problems = [f"{path.relative_to(ROOT)} {use}" for path in files for use in unsafe_uses(path.read_text())]
    assert problems == []


def _check_not_pickle(path: Path) -> None:
    data = path.read_bytes()
    assert data[:2] not in PICKLE_PROTOCOLS, f"{path} is a pickle"
    if zipfile.is_zipfile(path):  # torch.save's format: a zip holding data.pkl
        with zipfile.ZipFile(path) as z:
            assert not [n for n in z.namelist() if n.endswith(".pkl")], f"{path} holds a pickle"


def _check_format(path: Path) -> str:
    """Each file a run or an export writes is one of our data formats, checked by parsing it."""
    name = path.name
    if name.endswith(".apr"):
        assert validate_file(path).ok, path
        return "apr"
    if name.endswith(".safetensors"):
        parse_header(memoryview(path.read_bytes()), str(path))
        return "safetensors"
    if name.endswith(".jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
        return "jsonl"
    if name.endswith(".json"):
        json.loads(path.read_text())
        return "json"
    raise AssertionError(f"unexpected file {path}")


def test_run_and_export_files_are_data_not_code(tmp_path):
    tokens = tmp_path / "tokens.bin"
    write_token_file(tokens, [np.random.default_rng(0).integers(0, 512, 5000)], 512)
    run = tmp_path / "run"
    proc = run_apr("pretrain", "--arch", "tiny", "--data", tokens, "--out", run, "--steps", "2", "--save-every", "1",
                   "--seq-len", "32", "--batch-size", "4", "--val-batches", "2", "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    assert run_apr("export", run / "final.apr", "-o", tmp_path / "hf", "-q").returncode == 0
    files = [p for folder in (run, tmp_path / "hf") for p in folder.rglob("*") if p.is_file()]
    kinds = {}
    for path in files:
        _check_not_pickle(path)
        kind = _check_format(path)
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds.get("safetensors", 0) >= 3 and kinds.get("apr", 0) >= 3, kinds  # optimizer state included
