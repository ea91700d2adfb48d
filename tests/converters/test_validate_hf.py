"""`apr validate` on safetensors files and HF folders: the same checks and report as for an .apr."""

from __future__ import annotations

import json
import struct

import numpy as np
from safetensors.numpy import save_file

from apr_testing import run_apr


def _report(path, expect_rc):
    proc = run_apr("validate", path, "--json")
    assert proc.returncode == expect_rc, proc.stderr
    doc = json.loads(proc.stdout)
    return doc, {c["name"]: c for c in doc["checks"]}


def test_a_good_file_and_folder_pass(hf_qwen2_sharded):
    doc, checks = _report(hf_qwen2_sharded, 0)
    assert doc["format"] == "hf" and checks["shard index"]["status"] == "PASS"
    assert doc["total_tensors"] > 0 and doc["failed"] == 0
    assert set(checks) == {"config", "headers", "tensor bounds", "shard index", "nan/inf"}


def test_nan_and_inf_are_counted_per_tensor(tmp_path):
    values = np.zeros((4, 8), np.float32)
    values[0, 0], values[1, 1], values[2, 2] = np.nan, np.inf, -np.inf
    save_file({"a": values, "b": np.ones(3, np.float16)}, tmp_path / "m.safetensors")
    doc, checks = _report(tmp_path / "m.safetensors", 1)
    assert doc["format"] == "safetensors" and checks["nan/inf"]["status"] == "FAIL"
    assert (doc["total_nan"], doc["total_inf"]) == (1, 2)
    assert doc["nonfinite"] == [{"name": "a", "dtype": "f32", "nan": 1, "inf": 2}]


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def test_structural_problems_fail_with_their_reason(tmp_path):
    base = tmp_path / "m.safetensors"
    save_file({"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}, base)
    cases = {
        "overlap": (lambda h: h["b"].update(data_offsets=[0, 16]), "tensor bounds", "overlap"),
        "size": (lambda h: h["a"].update(shape=[5]), "tensor bounds", "needs 20"),
        "bounds": (lambda h: h["b"].update(data_offsets=[16, 48], shape=[8]), "tensor bounds", "beyond"),
    }
    for name, (edit, check, words) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(base.read_bytes())
        _rewrite_header(path, edit)
        _, checks = _report(path, 1)
        assert checks[check]["status"] == "FAIL" and words in checks[check]["detail"], (name, checks)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**6) + b"{" + b" " * 100)
    _, checks = _report(huge, 1)
    assert checks["headers"]["status"] == "FAIL" and "header" in checks["headers"]["detail"]


def test_shard_index_is_checked_against_the_shards(hf_qwen2_sharded, tmp_path):
    import shutil

    folder = tmp_path / "sharded"
    shutil.copytree(hf_qwen2_sharded, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    shard = index["weight_map"].pop(name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    doc, checks = _report(folder, 1)
    assert checks["shard index"]["status"] == "FAIL"
    assert name in checks["shard index"]["detail"] or shard in checks["shard index"]["detail"]


def test_other_files_name_what_they_are(tmp_path):
    (tmp_path / "notes.json").write_text('{"a": 1}')
    doc, checks = _report(tmp_path / "notes.json", 1)
    assert checks["magic"]["detail"] == "is a JSON file, not an APR file"
