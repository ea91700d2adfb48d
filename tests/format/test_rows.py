"""Tensors read on demand (`StoredRows`, `load_init_tensors(on_demand=True)`): the same values as a whole
read, rows at a time, and a file cut short after loading is `Truncated` naming it, never SIGBUS."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from apr_format import open_apr, save_apr
from apr_format.errors import InvalidArgument, Truncated
from apr_format.init_tensors import load_init_tensors
from apr_format.rows import OpenFile, StoredRows

from apr_testing import FIXTURES, apr_from_hf


@pytest.fixture
def mixed(tmp_path):
    path = tmp_path / "m.apr"
    arrays = {"a": np.arange(24, dtype=np.float32).reshape(6, 4),
              "b": np.linspace(-3, 3, 10).astype(ml_dtypes.bfloat16).reshape(5, 2),
              "s": np.array(7.5, dtype=np.float32)}
    save_apr(path, arrays, {})
    return path, arrays


def rows_of(path, name) -> StoredRows:
    f = open_apr(path, use_mmap=False)
    info = f.info(name)
    rows = StoredRows(OpenFile(os.dup(f.fileno()), f.path), f.header.data_offset + info.offset, info.dtype, info.shape)
    f.close()
    return rows


@pytest.mark.parametrize("name", ["a", "b"])
def test_rows_and_whole_reads_equal_the_stored_values(mixed, name):
    path, arrays = mixed
    rows = rows_of(path, name)
    whole = torch.from_numpy(np.asarray(arrays[name]).view(np.uint16)).view(torch.bfloat16) if name == "b" \
        else torch.from_numpy(arrays[name])
    assert rows.shape == whole.shape and rows.dtype == whole.dtype
    assert torch.equal(rows[...], whole)
    assert torch.equal(rows[1:4], whole[1:4]) and torch.equal(rows[3:], whole[3:])
    assert rows[2:2].shape == (0, *whole.shape[1:])
    with pytest.raises(TypeError):
        rows[::2]


def test_a_scalar_reads_whole(mixed):
    path, _ = mixed
    assert rows_of(path, "s")[...].item() == 7.5


def test_on_demand_loading_matches_eager_and_a_later_cut_is_truncated(tmp_path):
    path = apr_from_hf(FIXTURES / "tiny-qwen2-hf", tmp_path / "m.apr")
    eager = load_init_tensors(path)
    lazy = load_init_tensors(path, on_demand=True)
    assert set(lazy) == set(eager) and all(isinstance(v, StoredRows) for v in lazy.values())
    for name, tensor in eager.items():
        assert torch.equal(lazy[name][...], tensor), name
        assert torch.equal(lazy[name][0:1], tensor[0:1]), name
    with open_apr(path) as f:
        name = max(lazy, key=lambda n: f.info(n).offset)  # the last tensor: past the cut
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(Truncated, match="m.apr"):
        lazy[name][...]


def test_on_demand_loading_keeps_the_file_dtype_on_the_cpu(tmp_path):
    path = apr_from_hf(FIXTURES / "tiny-qwen2-hf", tmp_path / "m.apr")
    with pytest.raises(InvalidArgument, match="on_demand"):
        load_init_tensors(path, dtype=torch.float32, on_demand=True)
