"""Benchmark workloads, built locally once and cached: a Qwen2.5-0.5B-shaped HF checkpoint, its sharded twin and .apr files.

Usage: .venv/bin/python benchmarks/workload.py [--quick]   (builds what is missing, prints the paths as JSON)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APR, PYTHON, cache_dir  # noqa: E402

# Qwen2.5-0.5B's config.json on the HF hub: 494,032,768 parameters, tied embeddings, bf16.
QWEN25_05B = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
    vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
# --quick: the same family and features at about 12M parameters (seconds instead of minutes).
QWEN_QUICK = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024,
    vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
SHARD_SIZE = {"full": "200MB", "quick": "8MB"}
_VERSION = "2"  # bump when the way the workload is built changes: cached copies are rebuilt


def qwen2_architecture(shape: dict):
    """The trainer's ArchitectureConfig of an HF Qwen2 config dict (q/k/v biases, as Qwen2 has)."""
    from apr_format.architecture import ArchitectureConfig

    return ArchitectureConfig(
        family="qwen2", hidden_size=shape["hidden_size"], num_layers=shape["num_hidden_layers"],
        num_heads=shape["num_attention_heads"], num_kv_heads=shape["num_key_value_heads"],
        head_dim=shape["hidden_size"] // shape["num_attention_heads"], intermediate_size=shape["intermediate_size"],
        vocab_size=shape["vocab_size"], max_position_embeddings=shape["max_position_embeddings"],
        rope_theta=shape["rope_theta"], rms_norm_eps=shape["rms_norm_eps"],
        tie_word_embeddings=shape["tie_word_embeddings"], attention_bias=True,
    )


@dataclass(frozen=True)
class Workload:
    """Paths of one cached workload (all built by `ensure`)."""

    name: str
    hf: str  # folder: config.json + model.safetensors (save_pretrained)
    hf_sharded: str  # folder: the same weights, save_pretrained(max_shard_size=SHARD_SIZE)
    apr: str  # `apr convert hf` (aprender's lm_head copy of the tied embedding included)
    apr_no_copy: str  # `apr convert hf --no-lm-head-copy`
    params: int
    weights_bytes: int  # size of hf/model.safetensors

    @property
    def safetensors(self) -> str:
        return os.path.join(self.hf, "model.safetensors")


def folder(quick: bool) -> Path:
    """Where the workload of this size lives ($APR_BENCH_DIR/workload-{full,quick})."""
    return cache_dir("workload-quick" if quick else "workload-full")


def ensure(quick: bool = False) -> Workload:
    """Build whatever is missing (torch work in a child process, so the caller never imports torch)."""
    base = folder(quick)
    stamp = base / "workload.json"
    if stamp.exists():
        data = json.loads(stamp.read_text())
        if data.pop("version", None) == _VERSION and all(os.path.exists(data[k]) for k in ("hf", "apr")):
            return Workload(**data)
    quiet = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    subprocess.run([PYTHON, __file__, "--build-hf", *(["--quick"] if quick else [])], check=True, env=quiet)
    hf, apr, no_copy = base / "hf", base / "model.apr", base / "model-no-lm-head-copy.apr"
    env = {**os.environ, "NO_COLOR": "1"}
    subprocess.run([APR, "convert", str(hf), "-o", str(apr), "--force", "--quiet"], check=True, env=env)
    subprocess.run([APR, "convert", str(hf), "-o", str(no_copy), "--force", "--quiet", "--no-lm-head-copy"],
                   check=True, env=env)
    meta = json.loads((base / "build.json").read_text())
    workload = Workload(
        name="quick" if quick else "qwen2.5-0.5b", hf=str(hf), hf_sharded=str(base / "hf-sharded"), apr=str(apr),
        apr_no_copy=str(no_copy), params=meta["params"], weights_bytes=(hf / "model.safetensors").stat().st_size,
    )
    stamp.write_text(json.dumps({"version": _VERSION, **asdict(workload)}, indent=1))
    return workload


def _build_hf(quick: bool) -> None:
    """save_pretrained of a Qwen2 of the chosen shape with HF-style random weights (no NaN, real bytes)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = folder(quick)
    config = Qwen2Config(**(QWEN_QUICK if quick else QWEN25_05B))
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:  # biases too: non-zero, as in a trained model
                param.normal_(0.0, 0.02, generator=gen)
    model.tie_weights()  # to_empty gave lm_head its own storage: tie again so the file holds no head
    model.save_pretrained(base / "hf")
    model.save_pretrained(base / "hf-sharded", max_shard_size=SHARD_SIZE["quick" if quick else "full"])
    params = sum(p.numel() for p in model.parameters())
    (base / "build.json").write_text(json.dumps({"params": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the ~12M-parameter workload")
    parser.add_argument("--build-hf", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_hf:
        _build_hf(args.quick)
        return
    print(json.dumps(asdict(ensure(args.quick)), indent=1))


if __name__ == "__main__":
    main()
