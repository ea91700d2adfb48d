"""Benchmark `apr convert` on a Qwen2.5-0.5B-shaped bf16 checkpoint against `cp` and safetensors load+save.

Usage: .venv/bin/python benchmarks/bench_convert.py [--runs 3] [--json]
The checkpoint (about 1 GB) is built once under $APR_BENCH_DIR (default /tmp/apr-bench).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APR, PYTHON, cache_dir, measure, medians, report  # noqa: E402

# Qwen2.5-0.5B's shape (its config.json on the HF hub), tied embeddings, bf16.
QWEN25_05B = dict(
    hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
    vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
_SAFETENSORS_ROUND_TRIP = (
    "import sys\nfrom safetensors.torch import load_file, save_file\n"
    "save_file(load_file(sys.argv[1]), sys.argv[2], metadata={'format': 'pt'})\n"
)


def build_checkpoint(folder: Path) -> Path:
    """save_pretrained of an uninitialised (torch.empty) Qwen2 of the 0.5B shape; skipped when cached."""
    done = folder / ".complete"
    if done.exists():
        return folder
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**QWEN25_05B)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)  # no random init: the bytes do not matter here
    model.tie_weights()  # to_empty gives lm_head its own storage; tie it again so the file has no head
    model.save_pretrained(folder)
    done.touch()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_only:
        build_checkpoint(cache_dir("convert") / "qwen2.5-0.5b-shape")
        return

    work = cache_dir("convert")
    source = work / "qwen2.5-0.5b-shape"
    if not (source / ".complete").exists():
        # A child builds it: torch in this process would inflate every later child's peak RSS
        # (Linux carries the pre-exec high-water mark of a forked child into ru_maxrss).
        measure([PYTHON, __file__, "--build-only"])
    weights = source / "model.safetensors"
    out = work / "out"
    out.mkdir(exist_ok=True)
    env = {**os.environ, "NO_COLOR": "1"}

    def clean() -> None:
        for path in out.iterdir():
            path.unlink()
        os.sync()  # settle writeback so one run's dirty pages do not slow the next

    measure(["cat", str(weights)])  # warm the page cache once so every tool reads from memory
    apr = [APR, "convert", str(source), "-o", str(out / "m.apr"), "--quiet"]
    commands = {
        "cp": lambda: measure(["cp", str(weights), str(out / "copy.safetensors")]),
        # apr's writer fsyncs before its atomic rename; this is the like-for-like copy
        "cp + sync": lambda: measure(["sh", "-c", 'cp "$0" "$1" && sync "$1"', str(weights), str(out / "c.safetensors")]),
        "safetensors load+save": lambda: measure(
            [PYTHON, "-c", _SAFETENSORS_ROUND_TRIP, str(weights), str(out / "st.safetensors")], env=env
        ),
        "apr convert": lambda: measure(apr, env=env),
        "apr convert --no-lm-head-copy": lambda: measure([*apr, "--no-lm-head-copy"], env=env),
    }
    summaries = medians(commands, args.runs, clean)
    extra = {
        "checkpoint": str(weights), "checkpoint_bytes": weights.stat().st_size,
        "largest_tensor_bytes": QWEN25_05B["vocab_size"] * QWEN25_05B["hidden_size"] * 2,
        "runs": args.runs, "cpus": os.cpu_count(), "page_cache": "warm (source read from memory)",
        "note": "apr convert fsyncs its output; cp and safetensors save_file do not",
    }
    report("apr convert vs cp vs safetensors (Qwen2.5-0.5B shape, bf16)", summaries, extra,
           as_json=args.json, baseline="cp")
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
