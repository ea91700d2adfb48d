"""The training-state writer: safetensors' own reader gets back every tensor, bit for bit, whatever its dtype or shape."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from apr_trainer.checkpoint import load_state, save_state
from apr_trainer.state_file import write_tensors


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "optim.w.exp_avg": torch.randn(3, 5, generator=g),
        "optim.w.step": torch.tensor(7.0),  # 0-dim, as AdamW keeps it
        "rng.torch": torch.get_rng_state(),  # uint8
        "master.b": torch.randn(4, generator=g).to(torch.bfloat16),
        "half": torch.randn(2, 2, generator=g).half(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous
    }


def test_safetensors_reads_back_every_tensor_exactly(tmp_path):
    state = _state()
    path = tmp_path / "state.safetensors"
    with open(path, "wb") as out:
        write_tensors(out, state)
    back = load_file(path)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0 and json.loads(path.read_bytes()[8 : 8 + header_len])["__metadata__"] == {"format": "pt"}


@pytest.mark.parametrize("dtype", [torch.complex64, torch.bool, torch.int16])
def test_a_dtype_the_reader_cannot_read_is_refused_before_writing(tmp_path, dtype):
    """The state file holds the dtypes `TensorFile` reads back (APR's), nothing else."""
    with open(tmp_path / "s", "wb") as out, pytest.raises(TypeError, match=str(dtype).removeprefix("torch.")):
        write_tensors(out, {"ok": torch.zeros(2), "z": torch.zeros(2, dtype=dtype)})
    assert (tmp_path / "s").stat().st_size == 0


def test_save_state_round_trip_leaves_only_the_two_sidecars(tmp_path):
    state = _state()
    save_state(tmp_path / "step-000004.apr", {"step": 4, "tokens_seen": 128}, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004.state.json", "step-000004.state.safetensors"]
    (tmp_path / "step-000004.apr").touch()
    scalars, tensors = load_state(tmp_path / "step-000004.apr")
    assert scalars["step"] == 4 and scalars["tokens_seen"] == 128
    assert all(torch.equal(tensors[name], state[name]) for name in state)
