"""open_hf_source and the safetensors header parser: lazy, zero-copy, bounds-checked, torch-free."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apr_format.errors import AprError, CorruptSource, Truncated, UnknownDType
from apr_converters.hf_source import SourceTensor, open_hf_source
from apr_format.safetensors_reader import parse_header
from apr_format.safetensors_writer import OutTensor, write_safetensors

from apr_testing import run_apr


def st_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_single_folder(hf_qwen2):
    from safetensors.numpy import load_file

    expected = load_file(hf_qwen2 / "model.safetensors")
    with open_hf_source(hf_qwen2) as src:
        assert src.config["model_type"] == "qwen2"
        assert src.config_text == (hf_qwen2 / "config.json").read_text()
        assert src.files == [str(hf_qwen2 / "model.safetensors")]
        assert list(src.tensors) == sorted(expected)
        assert set(src.extra_files) == {"generation_config.json"}
        embed = src.tensors["model.embed_tokens.weight"]
        assert embed == SourceTensor("model.embed_tokens.weight", "f32", (300, 64), src.files[0], embed.start, 76800)
        view = src.raw("model.embed_tokens.weight")
        assert isinstance(view.obj, np.ndarray) and view.obj.base is None  # a pread copy the caller owns: no mapping
        np.testing.assert_array_equal(np.frombuffer(view, "<f4").reshape(300, 64), expected["model.embed_tokens.weight"])
        del view


def test_sharded_folder(hf_qwen2_sharded):
    index = json.loads((hf_qwen2_sharded / "model.safetensors.index.json").read_text())
    with open_hf_source(hf_qwen2_sharded) as src:
        assert len(src.files) == 11
        assert set(src.tensors) == set(index["weight_map"])
        for name, tensor in src.tensors.items():
            assert tensor.file.endswith(index["weight_map"][name])
        assert src.total_size == index["metadata"]["total_size"]


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_a_safetensors_file_the_model_does_not_use_is_reported(layout, hf_qwen2_sharded, hf_llama, tmp_path):
    """A leftover shard or an adapter beside the model is not converted, and the conversion says so
    (in the report, in --json, and on stderr under -q): never a file skipped without a word."""
    folder = tmp_path / layout
    shutil.copytree(hf_qwen2_sharded if layout == "sharded" else hf_llama, folder)
    shutil.copyfile(hf_llama / "model.safetensors", folder / "adapter_model.safetensors")
    chosen = "model.safetensors.index.json" if layout == "sharded" else "model.safetensors"
    with open_hf_source(folder) as src:
        assert src.ignored_files == ["adapter_model.safetensors"]
    warning = f"adapter_model.safetensors is not part of the model ({chosen} does not name it): not converted"
    report = run_apr("convert", folder, "-o", tmp_path / f"{layout}.apr", check=True)
    assert f"warning: {warning}" in report.stdout
    doc = json.loads(run_apr("convert", folder, "-o", tmp_path / f"{layout}-2.apr", "--json", check=True).stdout)
    assert warning in doc["warnings"]
    quiet = run_apr("convert", folder, "-o", tmp_path / f"{layout}-3.apr", "-q", check=True)
    assert quiet.stdout == "" and quiet.stderr == f"apr: warning: {warning}\n"


def test_bare_file(hf_llama):
    with open_hf_source(hf_llama / "model.safetensors") as src:
        assert src.config is None and src.config_text is None and src.extra_files == {}
        assert len(src.tensors) == 21


def test_importing_and_opening_does_not_load_torch(hf_qwen2):
    code = (
        "import sys\nfrom apr_converters.hf_source import open_hf_source\n"
        f"with open_hf_source({str(hf_qwen2)!r}) as s: s.raw('model.norm.weight')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_hf_source(tmp_path / "nope")


def test_several_files_without_index(hf_llama, tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes((hf_llama / "model.safetensors").read_bytes())
    with pytest.raises(CorruptSource, match="2 .safetensors files but no model.safetensors.index.json"):
        open_hf_source(tmp_path)


@pytest.mark.parametrize(
    "content,error,message",
    [
        (b"", Truncated, "file is 0 bytes, too short"),
        (struct.pack("<Q", 1000) + b"{}", Truncated, "header declares 1000 bytes but the file is 10 bytes"),
        (struct.pack("<Q", 2**40), CorruptSource, "header length 1099511627776 exceeds"),
        (struct.pack("<Q", 3) + b"{x}", CorruptSource, "not valid UTF-8 JSON"),
        (struct.pack("<Q", 2) + b"[]", CorruptSource, "is a JSON list, expected an object"),
        (st_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)), CorruptSource,
         "data_offsets 0..4 hold 4 bytes but F32 [2] needs 8"),
        (st_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4)), Truncated,
         "bytes 0..8 lie beyond the data section's end (4 bytes)"),
        (st_file({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), CorruptSource,
         "shape [-1] is not a list of non-negative integers"),
        (st_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, bytes(4)), CorruptSource,
         "data_offsets 4..0"),
        (st_file({"t": {"dtype": "F32", "shape": [1]}}, bytes(4)), CorruptSource, "is not a pair of non-negative integers"),
        (st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), CorruptSource,
         "tensors 'a' and 'b' overlap"),
        (st_file({"t": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, bytes(1)), UnknownDType,
         "tensor 't': safetensors dtype F8_E4M3 has no APR equivalent"),
        (st_file({"__metadata__": {"a": 1}}), CorruptSource, "__metadata__ must map strings to strings"),
    ],
)
def test_hostile_headers(tmp_path, content, error, message):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(error) as err:
        open_hf_source(path)
    assert message in str(err.value) and str(err.value).startswith(str(path))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data):
    try:
        parse_header(memoryview(struct.pack("<Q", len(data)) + data), "fuzz")
    except AprError:
        pass


def test_writer_output_is_read_by_safetensors(tmp_path):
    from safetensors.numpy import load_file

    arrays = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.arange(3, dtype=np.int64),
              "c": np.arange(5, dtype=np.uint8), "d": np.zeros((0, 4), dtype=np.float16)}
    tensors = [OutTensor(n, {"float32": "F32", "int64": "I64", "uint8": "U8", "float16": "F16"}[a.dtype.name],
                         a.shape, a.nbytes, lambda a=a: memoryview(a.tobytes())) for n, a in arrays.items()]
    with open(tmp_path / "w.safetensors", "wb") as out:
        write_safetensors(out, tensors, {"format": "pt"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
    header_len = struct.unpack("<Q", (tmp_path / "w.safetensors").read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_other_formats_are_named(tmp_path, hf_llama):
    from apr_converters.hf_to_apr import convert_hf_to_apr

    convert_hf_to_apr(hf_llama, tmp_path / "m.apr")
    with pytest.raises(CorruptSource, match="m.apr: is an .apr file, not safetensors"):
        open_hf_source(tmp_path / "m.apr")
    (tmp_path / "model.bin").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(CorruptSource, match="is a GGUF file, not safetensors"):
        open_hf_source(tmp_path / "model.bin")
