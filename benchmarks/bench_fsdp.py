"""Benchmark memory per rank: one `apr pretrain` step of a ~100M-parameter Llama on CPU, FSDP vs DDP vs one
process (2 gloo ranks), and activation checkpointing's peak memory and step time against none.

Usage: .venv/bin/python benchmarks/bench_fsdp.py [--quick] [--json]

Each figure is read from the run's own metrics (`peak_memory_mib` per rank: peak RSS on CPU, after
loading the --init .apr, the step-0 validation and one optimizer step). Every run gets
MALLOC_MMAP_THRESHOLD_=1 MiB: glibc otherwise raises its mmap threshold after the first large free,
so FSDP's per-layer gather buffers (tens of MB, freed after each layer) land in the heap and stay
in RSS after they are freed; with the fixed threshold RSS counts what is live. The model is
written once to $APR_BENCH_DIR as an f32 .apr. --quick uses a ~12M-parameter model (seconds, not figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import APR, PYTHON, cache_dir  # noqa: E402
from table import Row, render  # noqa: E402

GROUP = "pretrain on CPU, 2 gloo ranks: peak memory per rank after one step"
GROUP_AC = "pretrain on CPU, one process: activation checkpointing"
# ~110M parameters: 12 layers of hidden 768 (GQA 12/4 heads), SwiGLU 2048, untied 16k vocabulary.
LLAMA_100M = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=2048, vocab_size=16384)
LLAMA_QUICK = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=768, vocab_size=8192)
MMAP_THRESHOLD = 1 << 20  # bytes: allocations above it are mapped, and unmapped when freed (see above)
FLAGS = ["--batch-size", "4", "--seq-len", "256", "--val-batches", "1", "--val-every", "0", "--save-every", "0",
         "--device", "cpu", "--lr", "1e-4", "--warmup", "1", "--json", "-q"]


def workload(quick: bool) -> tuple[Path, Path, int]:
    """(model .apr, token file, parameter count), built once."""
    shape = LLAMA_QUICK if quick else LLAMA_100M
    folder = cache_dir("fsdp-quick" if quick else "fsdp-100m")
    model, tokens = folder / "llama.apr", folder / "tokens.bin"
    code = f"""
import numpy as np, torch
from apr_format import save_apr
from apr_format.architecture import ArchitectureConfig
from apr_trainer.data import write_token_file
from apr_trainer.model import DecoderLM
shape = {shape!r}
arch = ArchitectureConfig.from_metadata({{"hf_config": {{**shape, "model_type": "llama", "tie_word_embeddings": False,
    "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5}}}})
torch.manual_seed(0)
save_apr({str(model)!r}, DecoderLM(arch).state_dict(), arch.to_metadata())
ids = np.random.default_rng(0).integers(0, shape["vocab_size"], 200_000)
write_token_file({str(tokens)!r}, [ids], shape["vocab_size"])
print(arch.param_count())
"""
    count_file = folder / "params.txt"
    if not (model.exists() and tokens.exists() and count_file.exists()):
        out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
        count_file.write_text(out.stdout.strip())
    return model, tokens, int(count_file.read_text())


def _pretrain(out: Path, args: list, nproc: int = 1) -> list[dict]:
    """Run one `apr pretrain` (under torchrun when nproc > 1) and return its metrics records."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc)),
           "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    launcher = ([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                 "apr_cli.main"] if nproc > 1 else [APR])
    subprocess.run(["rm", "-rf", str(out)], check=True)
    proc = subprocess.run([*launcher, "pretrain", *map(str, args), "--out", str(out)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"apr pretrain exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def run(quick: bool = False) -> list[Row]:
    model, tokens, params = workload(quick)
    base = ["--init", model, "--data", tokens, *FLAGS]
    scratch = cache_dir("fsdp-runs")
    peaks = {}
    for name, nproc, extra in (("one process", 1, []), ("DDP", 2, ["--strategy", "ddp"]),
                               ("FSDP", 2, ["--strategy", "fsdp"])):
        records = _pretrain(scratch / name.replace(" ", "-"), [*base, "--steps", "1", *extra], nproc)
        peaks[name] = records[1]["peak_memory_mib"]
    note = (f"Llama {params / 1e6:.0f}M f32 --init, batch 4 x 256; per-rank peak RSS MiB: "
            + "; ".join(f"{k} {v}" for k, v in peaks.items()))
    fsdp, ddp, single = max(peaks["FSDP"]), max(peaks["DDP"]), max(peaks["one process"])
    rows = [Row(GROUP, "FSDP peak MiB per rank", "DDP peak MiB per rank", "MiB", fsdp, ddp, "<= 0.6x",
                fsdp / ddp <= 0.6, note=note),
            Row(GROUP, "DDP peak MiB per rank", "one process peak MiB", "MiB", ddp, single, note="reference")]
    timed = {}
    for name, extra in (("activation checkpointing", ["--activation-checkpointing"]), ("none", [])):
        records = _pretrain(scratch / f"ac-{name.replace(' ', '-')}", [*base, "--steps", "3", *extra])
        timed[name] = (records[-1]["peak_memory_mib"][0], statistics.median(r["tokens_per_s"] for r in records[2:]))
    (ac_mem, ac_rate), (mem, rate) = timed["activation checkpointing"], timed["none"]
    rows += [Row(GROUP_AC, "peak MiB with --activation-checkpointing", "peak MiB without", "MiB", ac_mem, mem,
                 "< 1.0x", ac_mem < mem, note="after 3 steps, batch 4 x 256"),
             Row(GROUP_AC, "tokens/s with --activation-checkpointing", "tokens/s without", "tok/s", ac_rate, rate,
                 note="median of steps 2-3; recomputing each layer costs about one more forward")]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~12M-parameter model (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    rows = run(args.quick)
    print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else render(rows))


if __name__ == "__main__":
    main()
