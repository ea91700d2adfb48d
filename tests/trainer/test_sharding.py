"""FSDP pieces over 2 gloo processes: each rank reads only its rows, a gathered save is byte-identical to
a one-process save, and a failing write on rank 0 stops every rank."""

from __future__ import annotations

import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apr_format import open_apr
from apr_format.errors import AprError
from apr_trainer import checkpoint, distributed, parallel
from apr_trainer.model import DecoderLM
from apr_trainer.precision import Precision
from apr_trainer.presets import preset
from apr_trainer.state_file import TensorFile

WORLD = 2


class RecordingRows:
    """A row source that remembers which rows were read (to prove a rank reads only its own)."""

    def __init__(self, tensor: torch.Tensor, log: list) -> None:
        self.tensor, self.log = tensor, log

    def __getitem__(self, rows: slice) -> torch.Tensor:
        self.log.append((rows.start, rows.stop))
        return self.tensor[rows]


def _spawn(fn, tmp_path: Path, *args) -> None:
    """Run fn(rank, tmp_path, *args) on 2 gloo ranks; a rank's failure fails the test with its traceback."""
    mp.spawn(_entry, args=(fn, tmp_path, args), nprocs=WORLD, join=True)
    failures = sorted(tmp_path.glob("failure-*.txt"))
    assert not failures, failures[0].read_text()


def _entry(rank: int, fn, tmp_path: Path, args) -> None:
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=rank, world_size=WORLD)
    ctx = distributed.setup("cpu")
    try:
        fn(ctx, tmp_path, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent through a file
        (tmp_path / f"failure-{rank}.txt").write_text(traceback.format_exc())
    finally:
        distributed.teardown(ctx)


def _model_and_weights():
    config = preset("tiny")
    torch.manual_seed(0)
    weights = DecoderLM(config).state_dict()
    with torch.device("meta"):
        model = DecoderLM(config)
    return model, weights


def _fsdp(ctx, weights, log=None):
    model, _ = _model_and_weights()
    sources = {k: RecordingRows(v, log) for k, v in weights.items()} if log is not None else weights
    return parallel.wrap(model, sources, ctx, Precision("fp32", "cpu", "f32"), "fsdp")


def _rows_read(ctx, tmp_path):
    log: list = []
    _, weights = _model_and_weights()
    par = _fsdp(ctx, weights, log)
    embed = par.module.model.embed_tokens.weight
    rows = embed.shape[0]
    half = -(-rows // WORLD)
    expected = (0, half) if ctx.rank == 0 else (half, rows)
    assert log[0] == expected  # the embedding: this rank's half only
    assert all(stop - start <= half for start, stop in log)
    assert embed.to_local().shape[0] == expected[1] - expected[0]
    for name, param in par.module.named_parameters():  # the local rows are the source's rows
        start, stop = expected if name == "model.embed_tokens.weight" else (None, None)
        if start is not None:
            assert torch.equal(param.to_local(), weights[name][start:stop])
        assert torch.equal(par.gather(param.detach()), weights[name]), name


def _rows_then_save_then_fail(ctx, tmp_path):
    _rows_read(ctx, tmp_path)
    _, weights = _model_and_weights()
    par = _fsdp(ctx, weights)
    params = dict(par.module.named_parameters())
    meta = {**preset("tiny").to_metadata(), "note": "gathered"}
    distributed.gather_on_main(ctx, params, par.gather, lambda fetch: checkpoint.save_weights(
        tmp_path / "sharded.apr", params, meta, dtype="f32", tied=True, fetch=fetch))

    def broken(fetch):
        fetch("model.norm.weight")
        raise OSError(28, "No space left on device")

    with pytest.raises((OSError, AprError)) as caught:
        distributed.gather_on_main(ctx, params, par.gather, broken)
    assert (ctx.rank == 0) == isinstance(caught.value, OSError)


def test_rows_read_per_rank_gathered_save_and_a_failing_write(tmp_path):
    _, weights = _model_and_weights()
    meta = {**preset("tiny").to_metadata(), "note": "gathered"}
    checkpoint.save_weights(tmp_path / "single.apr", weights, meta, dtype="f32", tied=True)
    _spawn(_rows_then_save_then_fail, tmp_path)
    with open_apr(tmp_path / "single.apr") as a, open_apr(tmp_path / "sharded.apr") as b:
        assert a.metadata == b.metadata and a.keys() == b.keys()
        assert [a.info(n) for n in a.keys()] == [b.info(n) for n in b.keys()]  # dtype, shape, offsets
    assert (tmp_path / "single.apr").read_bytes() == (tmp_path / "sharded.apr").read_bytes()
