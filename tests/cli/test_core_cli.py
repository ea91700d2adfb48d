"""The installed `apr` CLI: inspect, tensors and validate on real files, exit codes, escaping."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
from safetensors import safe_open

from apr_cli.tensors_cmd import natural_key
from apr_format import AprWriter, save_apr
from apr_testing import GOLDEN, build_hf_checkpoint, run_apr, run_apr_json

EXPECTED = json.loads((GOLDEN / "expected.json").read_text(encoding="utf-8"))
VALID = sorted(name for name, spec in EXPECTED.items() if spec["valid"])
INSPECT_KEYS = ("format", "version", "file_size", "tensor_count", "total_params", "architecture", "num_layers",
                "num_heads", "num_kv_heads", "hidden_size", "vocab_size", "flags", "metadata")
HOSTILE = "evil\x1b[31mred\x07bell\nnext\u202eline"


def _one_line_error(proc, path) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(path) in lines[0] and "Traceback" not in proc.stderr
    return lines[0]


# -- inspect -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALID)
def test_inspect_json_on_goldens(name):
    spec = EXPECTED[name]
    doc = run_apr_json("inspect", GOLDEN / name)
    assert all(key in doc for key in INSPECT_KEYS)
    assert (doc["format"], doc["version"], doc["file_size"]) == ("apr", "2.0", spec["file_size"])
    assert doc["flags"] == ["LAYOUT_ROW_MAJOR"] and doc["header"]["flags"] == spec["flags"]
    assert doc["tensor_count"] == len(spec["tensors"])
    assert doc["total_params"] == sum(math.prod(t["shape"]) for t in spec["tensors"].values())
    assert doc["metadata"] == spec["metadata"]
    for key in ("architecture", "num_layers", "num_heads", "num_kv_heads", "hidden_size", "vocab_size"):
        assert doc[key] == spec["metadata"].get(key)
    by_dtype = {}
    for t in spec["tensors"].values():
        by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + t["nbytes"]
    assert {d: h["bytes"] for d, h in doc["dtypes"].items()} == by_dtype


def test_inspect_json_values_for_tiny_llama():
    doc = run_apr_json("inspect", GOLDEN / "tiny-llama.apr")
    assert (doc["architecture"], doc["num_layers"], doc["num_heads"], doc["num_kv_heads"]) == ("llama", 2, 4, 2)
    assert (doc["hidden_size"], doc["vocab_size"]) == (64, 320)
    assert list(doc["metadata"])[:2] == ["architecture", "model_type"]  # architecture config first
    up = next(p for p in doc["patterns"] if p["pattern"] == "model.layers.#.mlp.up_proj.weight")
    assert (up["count"], up["dtypes"], up["shapes"]) == (2, ["bf16"], [[128, 64]])


def test_inspect_human_output():
    proc = run_apr("inspect", GOLDEN / "tiny-llama.apr", check=True)
    out = proc.stdout
    assert "LAYOUT_ROW_MAJOR (0x0400)" in out and "APR v2.0" in out
    assert "231,876 bytes" in out and "115,008" in out
    assert out.index("architecture") < out.index("num_layers") < out.index("original_format")
    pattern_line = next(line for line in out.splitlines() if line.startswith("model.layers.#.mlp.up_proj.weight"))
    assert pattern_line.split()[1:3] == ["2", "bf16"]
    assert proc.stderr == ""


def test_inspect_abbreviates_long_metadata_only_in_human_output(tmp_path):
    vocab = [f"tok{i}" for i in range(5000)]
    template = "{% for m in messages %}" * 50
    save_apr(tmp_path / "m.apr", {"w": np.zeros(2, np.float32)},
             {"architecture": "qwen2", "tokenizer.vocabulary": vocab, "chat_template": template,
              "hf_config": {f"k{i}": i for i in range(40)}})
    out = run_apr("inspect", tmp_path / "m.apr", check=True).stdout
    assert "[list of 5,000 items]" in out and "tok4999" not in out
    assert f"({len(template):,} chars)" in out
    assert "object with 40 keys" in out
    doc = run_apr_json("inspect", tmp_path / "m.apr")
    assert doc["metadata"]["tokenizer.vocabulary"] == vocab and doc["metadata"]["chat_template"] == template


# -- tensors -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALID)
def test_tensors_json_rows_point_at_the_right_bytes(name):
    spec = EXPECTED[name]
    doc = run_apr_json("tensors", GOLDEN / name)
    data = (GOLDEN / name).read_bytes()
    assert doc["count"] == len(spec["tensors"]) == len(doc["tensors"])
    assert [t["name"] for t in doc["tensors"]] == sorted(spec["tensors"], key=natural_key)
    for row in doc["tensors"]:
        want = spec["tensors"][row["name"]]
        assert list(row) == ["name", "dtype", "shape", "nbytes", "offset"]
        assert (row["dtype"], row["shape"], row["nbytes"]) == (want["dtype"], want["shape"], want["nbytes"])
        assert row["offset"] % 64 == 0
        assert hashlib.sha256(data[row["offset"] : row["offset"] + row["nbytes"]]).hexdigest() == want["sha256"]


def test_tensors_filter():
    doc = run_apr_json("tensors", GOLDEN / "tiny-qwen2.apr", "--filter", "model.layers.1.*proj.weight")
    names = [t["name"] for t in doc["tensors"]]
    assert len(names) == doc["count"] == 7
    assert all(n.startswith("model.layers.1.") and n.endswith("proj.weight") for n in names)
    nothing = run_apr("tensors", GOLDEN / "tiny-qwen2.apr", "--filter", "nothing*", "--json")
    assert nothing.returncode == 1 and json.loads(nothing.stdout)["tensors"] == []
    assert "no tensor name matches nothing*" in nothing.stderr
    human = run_apr("tensors", GOLDEN / "tiny-qwen2.apr", "--filter", "*norm*", check=True).stdout
    assert "model.norm.weight" in human and "q_proj" not in human and "5 tensors" in human


def test_tensors_sort_layer_numbers_naturally(tmp_path):
    names = [f"model.layers.{i}.w" for i in (10, 2, 1, 0, 11, 3)]
    save_apr(tmp_path / "m.apr", {name: np.zeros(2, np.float32) for name in names})
    listed = [t["name"] for t in run_apr_json("tensors", tmp_path / "m.apr")["tensors"]]
    assert listed == [f"model.layers.{i}.w" for i in (0, 1, 2, 3, 10, 11)]
    human = run_apr("tensors", tmp_path / "m.apr", check=True).stdout
    assert human.index("layers.2.") < human.index("layers.10.")


def test_tensors_on_zstd_file_shows_stored_bytes(tmp_path):
    save_apr(tmp_path / "z.apr", {"zeros": np.zeros((64, 64), np.float32)}, compression="zstd")
    (row,) = run_apr_json("tensors", tmp_path / "z.apr")["tensors"]
    assert row["nbytes"] == 64 * 64 * 4 and 0 < row["stored"] < row["nbytes"]


# -- validate ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VALID)
def test_validate_passes_valid_goldens(name):
    proc = run_apr("validate", GOLDEN / name, "--json")
    assert proc.returncode == 0, proc.stdout
    doc = json.loads(proc.stdout)
    assert list(doc)[:6] == ["path", "format", "checks", "failed", "total_tensors", "total_nan"]
    assert (doc["failed"], doc["total_tensors"], doc["total_nan"], doc["total_inf"]) == (
        0, len(EXPECTED[name]["tensors"]), 0, 0)
    names = [c["name"] for c in doc["checks"]]
    assert {"magic", "header checksum", "tensor index", "alignment", "footer checksum", "nan/inf"} <= set(names)
    assert all(c["status"] == "PASS" and c["detail"] for c in doc["checks"])
    human = run_apr("validate", GOLDEN / name)
    assert human.returncode == 0 and "valid" in human.stdout.splitlines()[-1]


def test_validate_bad_footer_checksum_exits_1():
    proc = run_apr("validate", GOLDEN / "bad-footer-checksum.apr", "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["failed"] == 1
    assert [c["name"] for c in doc["checks"] if c["status"] == "FAIL"] == ["footer checksum"]
    human = run_apr("validate", GOLDEN / "bad-footer-checksum.apr")
    assert human.returncode == 1 and "INVALID (1 of 11 checks failed)" in human.stdout
    assert "footer CRC-32 mismatch" in human.stdout


@pytest.mark.parametrize("name,check", [("bad-magic.apr", "magic"), ("truncated.apr", "tensor bounds"),
                                        ("legacy-v1-aprn.apr", "magic"), ("column-major.apr", "flags")])
def test_validate_reports_unparseable_files_as_failed_checks(name, check):
    proc = run_apr("validate", GOLDEN / name, "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout)
    assert [c["name"] for c in doc["checks"] if c["status"] == "FAIL"] == [check]


def test_validate_reports_nan_per_tensor(tmp_path):
    values = np.ones(10, np.float32)
    values[[1, 3]] = np.nan
    values[5] = -np.inf
    save_apr(tmp_path / "n.apr", {"bad": values, "good": np.ones(3, np.float32)})
    proc = run_apr("validate", tmp_path / "n.apr", "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert (doc["total_nan"], doc["total_inf"]) == (2, 1)
    assert doc["nonfinite"] == [{"name": "bad", "dtype": "f32", "nan": 2, "inf": 1}]


# -- errors and exit codes -----------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "tensors", "validate"])
def test_missing_file_and_directory_exit_2(command, tmp_path):
    for path in (tmp_path / "missing.apr", tmp_path):
        for extra in ((), ("--json",)):
            proc = run_apr(command, path, *extra)
            assert proc.returncode == 2, (command, path, proc.stderr)
            assert proc.stdout == ""
            _one_line_error(proc, path)


@pytest.mark.parametrize("command", ["inspect", "tensors"])
@pytest.mark.parametrize("name,words", [
    ("bad-magic.apr", "GGUF"), ("truncated.apr", "beyond the file's end"),
    ("legacy-v1-aprn.apr", "APR v1"), ("bad-header-checksum.apr", "header checksum"),
    ("column-major.apr", "LAYOUT_COLUMN_MAJOR"), ("huge-tensor-count.apr", "tensor_count 4294967295"),
])
def test_unreadable_files_exit_2_with_one_line(command, name, words):
    proc = run_apr(command, GOLDEN / name, "--json")
    assert proc.returncode == 2 and proc.stdout == ""
    assert words in _one_line_error(proc, GOLDEN / name)


# -- hostile names -------------------------------------------------------------------------
def test_hostile_tensor_name_is_escaped_in_human_output(tmp_path):
    path = tmp_path / "hostile.apr"
    values = np.ones(4, np.float32)
    values[0] = np.nan
    with AprWriter(path, {"architecture": "llama", HOSTILE: HOSTILE}) as w:
        w.add(HOSTILE, values)
    escaped = "evil\\x1b[31mred\\x07bell\\nnext\\u202eline"
    for args in (("tensors",), ("inspect",), ("validate",)):
        proc = run_apr(*args, path)
        assert proc.returncode == (1 if args[0] == "validate" else 0), proc.stderr
        for raw in ("\x1b", "\x07", "\u202e"):
            assert raw not in proc.stdout, args
        assert escaped in proc.stdout, args
    doc = run_apr_json("tensors", path)
    assert doc["tensors"][0]["name"] == HOSTILE  # JSON carries the real name
    assert run_apr_json("inspect", path)["metadata"][HOSTILE] == HOSTILE


# -- safetensors and HF folders ------------------------------------------------------------
def _safetensors_reference(files) -> dict[str, np.ndarray]:
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@pytest.mark.parametrize("target", ["folder", "file"])
def test_inspect_hf_checkpoint(hf_qwen2, target):
    path = hf_qwen2 if target == "folder" else hf_qwen2 / "model.safetensors"
    doc = run_apr_json("inspect", path)
    reference = _safetensors_reference([hf_qwen2 / "model.safetensors"])
    assert doc["format"] == "safetensors"
    assert doc["tensor_count"] == len(reference)
    assert doc["total_params"] == sum(t.size for t in reference.values())
    assert doc["file_size"] == (hf_qwen2 / "model.safetensors").stat().st_size
    assert doc["dtypes"] == {"f32": {"tensors": len(reference), "params": doc["total_params"],
                                     "bytes": sum(t.nbytes for t in reference.values())}}
    if target == "folder":
        assert (doc["architecture"], doc["num_layers"], doc["num_heads"], doc["num_kv_heads"]) == ("qwen2", 2, 4, 2)
        assert (doc["hidden_size"], doc["vocab_size"]) == (64, 300)
        assert "num_hidden_layers" not in doc["metadata"] and doc["metadata"]["num_layers"] == 2
        assert doc["metadata"]["rope_theta"] == 1000000.0  # transformers 5 keeps it in rope_parameters
        assert list(doc["metadata"])[0] == "architecture" and "model_type" not in doc["metadata"]
    else:
        assert doc["architecture"] is None and doc["metadata"] == {}
    assert "model.layers.#.self_attn.q_proj.bias" in [p["pattern"] for p in doc["patterns"]]
    human = run_apr("inspect", path, check=True).stdout
    assert "safetensors" in human and "model.layers.#.mlp.up_proj.weight" in human


def test_tensors_on_sharded_hf_folder(tmp_path):
    folder = build_hf_checkpoint(tmp_path / "llama", "llama", max_shard_size="100KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1
    reference = _safetensors_reference(shards)
    doc = run_apr_json("tensors", folder)
    assert doc["format"] == "safetensors" and doc["count"] == len(reference)
    for row in doc["tensors"]:
        want = reference[row["name"]]
        assert (row["dtype"], row["shape"], row["nbytes"]) == ("f32", list(want.shape), want.nbytes)
        data = (folder / row["file"]).read_bytes()
        assert data[row["offset"] : row["offset"] + row["nbytes"]] == want.tobytes()
    filtered = run_apr_json("tensors", folder, "--filter", "lm_head.*")
    assert [t["name"] for t in filtered["tensors"]] == ["lm_head.weight"]
