"""FSDP and DDP over 2 gloo processes against one process (same global batch), resume on another world
size, activation checkpointing and bf16-mixed: real `apr pretrain` runs under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from apr_format import open_apr
from apr_testing import apr_from_hf, build_hf_checkpoint, learnable_tokens, read_metrics, run_apr, torchrun
from apr_trainer.data import write_token_file
from apr_trainer.state_file import TensorFile

STEPS = 8
FLAGS = ["--steps", str(STEPS), "--batch-size", "8", "--grad-accum", "2", "--seq-len", "32", "--lr", "3e-3",
         "--warmup", "2", "--val-every", "4", "--save-every", "4", "--device", "cpu", "--log-every", "1",
         "--val-batches", "3"]
TOLERANCE = dict(rel=1e-5, abs=1e-6)
# family -> the flags the 2-process FSDP run adds (Llama also checkpoints activations: same curve expected)
FAMILIES = {"qwen2": [], "llama": ["--activation-checkpointing"]}


def _inputs(root: Path, family: str) -> list:
    """An .apr of a tiny HF model (Qwen2: tied, biases, GQA; Llama: untied) and a learnable token file."""
    hf = build_hf_checkpoint(root / "hf", family)
    model = apr_from_hf(hf, root / "model.apr")
    vocab = {"qwen2": 300, "llama": 320}[family]
    write_token_file(root / "tokens.bin", [learnable_tokens(20_000, vocab, step=5, offset=1, noise=4)], vocab)
    return ["--init", model, "--data", root / "tokens.bin", *FLAGS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs(family): one run on one process, one under FSDP and one under DDP on 2 processes, same command
    (made once per family and test process)."""
    cache: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in cache:
            root = tmp_path_factory.mktemp(family)
            args = _inputs(root, family)
            run_apr("pretrain", *args, "--out", root / "single", check=True)
            for strategy, extra in (("fsdp", FAMILIES[family]), ("ddp", [])):
                proc = torchrun("pretrain", *args, "--out", root / strategy, "--strategy", strategy, *extra, "--json")
                assert proc.returncode == 0, proc.stderr[-3000:]
                summary = json.loads(proc.stdout)
                assert (summary["strategy"], summary["world_size"], summary["precision"]) == (strategy, 2, "fp32")
                assert len(summary["peak_memory_bytes"]) == 2 and min(summary["peak_memory_bytes"]) > 0
                assert f"parallel: {strategy} over 2 rank(s)" in proc.stderr
            cache[family] = {name: root / name for name in ("single", "fsdp", "ddp")}
        return cache[family]

    return get


def _assert_same_curve(expected: list[dict], got: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], **TOLERANCE), (a["step"], key)


def _assert_same_weights(expected: Path, got: Path) -> None:
    """Read back by the golden-tested reader: same layout and metadata (but the logged losses and each
    checkpoint's own created_at), same tensors."""
    with open_apr(expected) as f, open_apr(got) as g:
        assert f.keys() == g.keys()
        assert [(f.info(n).dtype, f.info(n).shape) for n in f.keys()] == [(g.info(n).dtype, g.info(n).shape)
                                                                        for n in g.keys()]
        drop = ("training", "created_at")
        assert {k: v for k, v in f.metadata.items() if k not in drop} == {
            k: v for k, v in g.metadata.items() if k not in drop}
        assert f.metadata["training"]["step"] == g.metadata["training"]["step"]
        for name in f.keys():
            # A key bias shifts every score of a query alike, so softmax makes its gradient zero in exact
            # arithmetic: what is left is rounding noise, which AdamW scales up to ~lr * noise / eps and
            # which depends on the reduction order (the same in DDP and FSDP, ~1e-5 off one process).
            atol = 1e-4 if name.endswith("k_proj.bias") else 1e-5
            np.testing.assert_allclose(g[name], f[name], rtol=1e-5, atol=atol, err_msg=name)
        g.verify()


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_and_ddp_on_two_processes_match_one_process_step_by_step(family, runs):
    folders = runs(family)
    single = read_metrics(folders["single"])
    assert len(single) == STEPS + 1
    one = TensorFile(folders["single"] / "checkpoints" / "step-000008.state.safetensors")
    for strategy in ("fsdp", "ddp"):
        multi = read_metrics(folders[strategy])
        _assert_same_curve(single, multi)
        assert all(r["strategy"] == strategy and r["world_size"] == 2 for r in multi[1:])
        _assert_same_weights(folders["single"] / "final.apr", folders[strategy] / "final.apr")
        two = TensorFile(folders[strategy] / "checkpoints" / "step-000008.state.safetensors")
        assert set(one) == set(two)  # the optimizer state has one layout whatever the world size
        for name in one:
            if name.startswith("optim."):
                torch.testing.assert_close(two[name][...], one[name][...], rtol=1e-4, atol=1e-6)


def test_resume_on_another_world_size_continues_the_same_curve(runs, tmp_path):
    folders = runs("qwen2")
    expected = read_metrics(folders["single"])
    for strategy in ("fsdp", "ddp"):
        out = tmp_path / strategy
        # 2 -> 1: the 2-process run's step-4 checkpoint continues on one process
        run_apr("pretrain", "--resume", folders[strategy] / "checkpoints" / "step-000004.apr", "--out", out / "one",
                "--strategy", "auto", check=True)
        # 1 -> 2: the single-process run's step-4 checkpoint continues on two
        proc = torchrun("pretrain", "--resume", folders["single"] / "checkpoints" / "step-000004.apr", "--out",
                        out / "two", "--strategy", strategy)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "resume: step 4" in proc.stderr
        for folder, world in (("one", 1), ("two", 2)):
            resumed = read_metrics(out / folder)
            _assert_same_curve(expected[5:], resumed[-4:])
            assert {r["world_size"] for r in resumed[-4:]} == {world}
            _assert_same_weights(folders["single"] / "final.apr", out / folder / "final.apr")


def test_bf16_mixed_under_fsdp_trains_and_keeps_fp32_masters(tmp_path):
    args = _inputs(tmp_path, "qwen2")
    proc = torchrun("pretrain", *args, "--out", tmp_path / "run", "--strategy", "fsdp", "--precision", "bf16-mixed",
                    "--steps", "12", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["precision"] == "bf16-mixed" and summary["strategy"] == "fsdp"
    assert summary["final_val_loss"] < summary["start_val_loss"] - 0.2, summary
    state = TensorFile(tmp_path / "run" / "checkpoints" / "step-000012.state.safetensors")
    moments = [name for name in state if name.endswith((".exp_avg", ".exp_avg_sq"))]
    assert moments and {state[n][...].dtype for n in moments} == {torch.float32}
    with open_apr(tmp_path / "run" / "final.apr") as f:  # the f32 --init file's dtype: fp32 masters
        assert {f.info(n).dtype for n in f.keys()} == {"f32"}


def _grads(checkpointing: bool, precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    from apr_trainer import distributed, parallel
    from apr_trainer.model import DecoderLM
    from apr_trainer.precision import Precision
    from apr_trainer.presets import preset

    config = preset("tiny")
    torch.manual_seed(0)
    weights = DecoderLM(config).state_dict()
    with torch.device("meta"):
        model = DecoderLM(config)
    ctx = distributed.setup("cpu")
    prec = Precision.for_run(ctx.device, precision, "auto", "f32")
    par = parallel.wrap(model, weights, ctx, prec, "single", activation_checkpointing=checkpointing)
    ids = torch.randint(0, config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    with prec.autocast():
        loss = par.forward(ids[:, :-1], ids[:, 1:])
    loss.backward()
    grads = {n: p.grad for n, p in par.module.named_parameters()}
    assert {p.dtype for p in par.module.parameters()} == {torch.float32}  # fp32 masters under autocast too
    return loss.item(), grads


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(precision):
    plain, recomputed = _grads(False, precision), _grads(True, precision)
    assert recomputed[0] == plain[0]
    for name, grad in plain[1].items():
        assert torch.equal(recomputed[1][name], grad), name
    assert any(g.abs().sum() > 0 for g in plain[1].values())


def test_bf16_mixed_on_one_cpu_process_trains(tmp_path):
    args = _inputs(tmp_path, "llama")
    summary = json.loads(run_apr("pretrain", *args, "--out", tmp_path / "run", "--precision", "bf16-mixed", "--json",
                                 check=True).stdout)
    assert (summary["precision"], summary["strategy"]) == ("bf16-mixed", "single")
    assert summary["final_val_loss"] < summary["start_val_loss"] - 0.2, summary


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fsdp_over_one_rank_with_auto_precision_and_activation_checkpointing(tmp_path):
    args = _inputs(tmp_path, "qwen2")
    args[args.index("--device") + 1] = "cuda"
    summary = json.loads(run_apr("pretrain", *args, "--out", tmp_path / "run", "--strategy", "fsdp",
                                 "--activation-checkpointing", "--json", check=True).stdout)
    assert (summary["precision"], summary["strategy"], summary["world_size"]) == ("bf16-mixed", "fsdp", 1)
    assert summary["final_val_loss"] < summary["start_val_loss"] - 0.2, summary
    with open_apr(tmp_path / "run" / "final.apr") as f:
        assert {f.info(n).dtype for n in f.keys()} == {"f32"}
