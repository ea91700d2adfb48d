"""Test helpers importable from any test: tiny real HF checkpoints, a CLI runner, token streams, run metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
GOLDEN = FIXTURES / "golden"
# The console script installed next to this interpreter (what users run); `-m` as a fallback.
_SCRIPT = Path(sys.executable).with_name("apr")
APR_COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "apr_cli.main"]

# Small shapes with the features that matter: GQA, q/k/v biases (qwen2), tied and untied heads.
TINY_QWEN2 = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=300, max_position_embeddings=128, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True,
)
TINY_LLAMA = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, vocab_size=320, max_position_embeddings=128, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)


def build_hf_checkpoint(
    folder: Path, family: str, *, dtype: str = "float32", seed: int = 0, max_shard_size: str | None = None, **overrides
) -> Path:
    """Save a randomly initialised transformers model of `family` ("qwen2" or "llama") to `folder`."""
    import torch
    import transformers

    config_cls, model_cls, base = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, TINY_QWEN2),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, TINY_LLAMA),
    }[family]
    torch.manual_seed(seed)
    config = config_cls(**{**base, **overrides})
    model = model_cls(config).to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def build_hf_checkpoint_with_tokenizer(folder: Path, family: str, **overrides) -> Path:
    """`build_hf_checkpoint` with 512 embedding rows plus the checked-in tiny BPE tokenizer (400 tokens,
    eos <|im_end|>, a ChatML chat template) from fixtures/tiny-qwen2-hf."""
    import shutil

    build_hf_checkpoint(folder, family, **{"vocab_size": 512, **overrides})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(FIXTURES / "tiny-qwen2-hf" / name, folder / name)
    return folder


def transformers_greedy(reference, prompt_ids: list[int], n: int, **kwargs) -> list[int]:
    """The ids transformers' `generate(do_sample=False)` adds to `prompt_ids` (kwargs: e.g. eos_token_id)."""
    import torch

    ids = torch.tensor([list(prompt_ids)])
    kwargs.setdefault("pad_token_id", 0)
    out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def transformers_loss(reference, ids, seq_len: int, batch: int = 8) -> tuple[float, int]:
    """(mean next-token cross-entropy, windows) of a transformers model over the non-overlapping
    `seq_len` windows of `ids` (last partial window dropped): the perplexity definition of `apr eval`."""
    import torch
    import torch.nn.functional as F

    windows = len(ids) // seq_len
    rows = torch.as_tensor(np.asarray(ids[: windows * seq_len], dtype=np.int64)).view(windows, seq_len)
    total = 0.0
    with torch.no_grad():
        for chunk in rows.split(batch):
            logits = reference(chunk).logits[:, :-1].double()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
    return total / (windows * (seq_len - 1)), windows


def run_apr(*args: str | os.PathLike, check: bool = False, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the installed `apr` CLI in a subprocess and capture its output as text."""
    env = {**os.environ, "NO_COLOR": "1"}
    env.pop("APR_DEBUG", None)
    proc = subprocess.run(
        [*APR_COMMAND, *map(str, args)],
        capture_output=True, env=env, input=input, timeout=600,
    )
    out = subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    )
    if check and out.returncode != 0:
        raise AssertionError(f"apr {' '.join(map(str, args))} exited {out.returncode}:\n{out.stderr}")
    return out


def run_apr_json(*args: str | os.PathLike) -> dict:
    """Run `apr ... --json` expecting success, return the parsed JSON."""
    proc = run_apr(*args, "--json", check=True)
    return json.loads(proc.stdout)


def learnable_tokens(n: int, vocab: int, *, step: int = 7, offset: int = 3, noise: int = 3, seed: int = 0) -> np.ndarray:
    """A token stream a model can learn: each id is (previous * step + offset + a little noise) % vocab."""
    rng = np.random.default_rng(seed)
    ids = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        ids[i] = (ids[i - 1] * step + offset + rng.integers(0, noise)) % vocab
    return ids


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Every record of a training run's metrics.jsonl."""
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
