"""The training loop: --init really loads (val loss == transformers'), loss goes down, checkpoints, schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from apr_format import open_apr
from apr_testing import apr_from_hf, build_hf_checkpoint, learnable_tokens, read_metrics, run_apr
from apr_trainer import checkpoint
from apr_trainer.config import TrainConfig
from apr_trainer.data import write_token_file
from apr_trainer.model import DecoderLM
from apr_trainer.optim import lr_at
from apr_trainer.train import train

SEQ = 32


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def source(request, tmp_path_factory):
    """(HF folder, .apr of it, token file): weights far from a fresh init (initializer_range 0.2)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = build_hf_checkpoint(folder / "hf", request.param, initializer_range=0.2)
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    write_token_file(folder / "tokens.bin", [np.random.default_rng(1).integers(0, vocab, 3000)], vocab)
    return hf, apr_from_hf(hf, folder / "model.apr"), folder / "tokens.bin"


def transformers_val_loss(hf: Path, tokens: Path, val_fraction: float, windows: int) -> float:
    """Mean next-token loss of the HF model over the documented validation windows, computed by transformers."""
    import transformers

    ids = np.fromfile(tokens, dtype="<u2").astype(np.int64)
    n_val = max(math.ceil(len(ids) * val_fraction), SEQ + 1)
    start = len(ids) - n_val  # the held-out tail; windows of SEQ+1 tokens, SEQ apart
    count = min(windows, (n_val - 1) // SEQ)
    batch = torch.tensor(np.stack([ids[start + k * SEQ : start + k * SEQ + SEQ + 1] for k in range(count)]))
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()


def test_init_val_loss_equals_transformers_loss(source, tmp_path):
    hf, apr, tokens = source
    common = ["--data", tokens, "--steps", "0", "--seq-len", str(SEQ), "--batch-size", "4", "--val-batches", "2",
              "--device", "cpu", "--json"]
    loaded = run_apr("pretrain", "--init", apr, "--out", tmp_path / "init", *common, check=True)
    start = json.loads(loaded.stdout)["start_val_loss"]
    reference = transformers_val_loss(hf, tokens, val_fraction=0.05, windows=8)
    assert abs(start - reference) < 1e-4, (start, reference)
    assert f"val_loss {start:.4f} -- weights from {apr}" in loaded.stderr
    # The same architecture from random weights starts somewhere else entirely.
    arch = tmp_path / "arch.json"
    with open_apr(apr) as f:
        arch.write_text(json.dumps(f.metadata))
    fresh = run_apr("pretrain", "--arch-config", arch, "--out", tmp_path / "random", *common, check=True)
    assert abs(json.loads(fresh.stdout)["start_val_loss"] - reference) > 0.5
    assert "RANDOM INIT" in fresh.stderr


def _config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), out_dir=str(tmp_path / "run"), arch="tiny", steps=30, batch_size=8, seq_len=SEQ,
                  lr=3e-3, warmup=3, val_every=10, save_every=0, device="cpu", log_every=10)
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def markov_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("markov") / "markov.bin"
    write_token_file(path, [learnable_tokens(20_000, 300)], 300)
    return path


def test_short_run_lowers_validation_loss(tmp_path, markov_file):
    lines: list[str] = []
    summary = train(_config(tmp_path, markov_file), lines.append)
    assert summary.final_val_loss < summary.start_val_loss - 0.5, summary
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(31))
    assert records[0] == {"step": 0, "val_loss": summary.start_val_loss, "tokens_seen": 0}
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"} <= set(records[1])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20, 30]
    assert records[-1]["tokens_seen"] == 30 * 8 * SEQ
    assert any("RANDOM INIT of preset tiny" in line for line in lines)


def test_same_seed_same_run_other_seed_other_run(tmp_path, markov_file):
    def losses(name: str, seed: int) -> list[float]:
        summary = train(_config(tmp_path / name, markov_file, steps=4, seed=seed))
        return [record.get("loss") for record in read_metrics(summary.run_dir)[1:]]

    first = losses("a", 5)
    assert first == losses("b", 5)
    assert first != losses("c", 6)


def test_grad_accumulation_matches_the_full_batch(tmp_path, markov_file):
    full = train(_config(tmp_path / "full", markov_file, steps=5, batch_size=8, grad_accum=1))
    accum = train(_config(tmp_path / "accum", markov_file, steps=5, batch_size=4, grad_accum=2))
    for a, b in zip(read_metrics(full.run_dir)[1:], read_metrics(accum.run_dir)[1:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_checkpoints_keep_input_metadata_dtype_and_tied_head(tmp_path, hf_qwen2, markov_file):
    apr = apr_from_hf(hf_qwen2, tmp_path / "bf16.apr", torch.bfloat16)
    with open_apr(apr) as f:
        source_meta = f.metadata
    summary = train(_config(tmp_path, markov_file, arch=None, init=str(apr), steps=4, save_every=2, val_every=0))
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-000002.apr", "step-000002.state.json", "step-000002.state.safetensors",
        "step-000004.apr", "step-000004.state.json", "step-000004.state.safetensors"]
    with open_apr(run / "final.apr") as f:
        meta = f.metadata
        assert {t.dtype for t in f.tensors()} == {"bf16"}  # the input's dtype
        assert np.array_equal(f["lm_head.weight"], f["model.embed_tokens.weight"])  # aprender's tied copy
        f.verify()
    assert meta["tied_embeddings"] is True and "tie_word_embeddings" not in meta
    assert {k: v for k, v in meta.items() if k not in ("training", "tied_embeddings")} == {
        k: v for k, v in source_meta.items() if k != "tie_word_embeddings"}
    assert meta["training"]["step"] == 4 and meta["training"]["tokens_seen"] == 4 * 8 * SEQ
    assert meta["training"]["loss"] == summary.final_loss and meta["training"]["val_loss"] == summary.final_val_loss
    scalars, tensors = checkpoint.load_state(run / "checkpoints" / "step-000004.apr")
    model = DecoderLM.from_apr(run / "final.apr")
    names = [n for n, _ in model.named_parameters()]
    assert scalars["step"] == 4 and scalars["save_dtype"] == "bf16"
    assert {f"optim.{n}.exp_avg" for n in names} <= set(tensors) and "rng.torch" in tensors
    assert {f"master.{n}" for n in names} <= set(tensors)  # exact fp32 weights behind the bf16 file
    assert torch.equal(tensors["master.model.norm.weight"].to(torch.bfloat16), model.model.norm.weight)


def test_final_apr_reproduces_the_logged_val_loss(tmp_path, markov_file):
    summary = train(_config(tmp_path, markov_file, steps=6, val_every=0))
    model = DecoderLM.from_apr(summary.final, dtype=torch.float32)
    ids = np.fromfile(markov_file, dtype="<u2").astype(np.int64)
    start = summary.train_tokens
    batch = torch.tensor(np.stack([ids[start + k * SEQ : start + k * SEQ + SEQ + 1] for k in range(31)]))
    with torch.no_grad():
        loss = model(batch[:, :-1], batch[:, 1:]).item()
    assert loss == pytest.approx(summary.final_val_loss, abs=1e-5)


def test_warmup_then_cosine_to_ten_percent():
    config = TrainConfig(data="x", out_dir="y", lr=1e-3, warmup=10, steps=110)
    assert lr_at(0, config) == pytest.approx(1e-4)
    assert lr_at(9, config) == pytest.approx(1e-3)
    assert lr_at(60, config) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, config) == pytest.approx(1e-4)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 110))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_with_bf16_autocast_and_fused_adamw(tmp_path, markov_file):
    summary = train(_config(tmp_path, markov_file, device="cuda", save_every=15))
    assert summary.final_val_loss < summary.start_val_loss - 0.5, summary
    scalars, tensors = checkpoint.load_state(Path(summary.run_dir) / "checkpoints" / "step-000015.apr")
    assert "rng.cuda" in tensors and scalars["save_dtype"] == "f32"
    with open_apr(summary.final) as f:
        assert {t.dtype for t in f.tensors()} == {"f32"}
