"""Benchmark saving a checkpoint's training state (AdamW moments) against safetensors' own save_file.

Usage: .venv/bin/python benchmarks/bench_state.py [--runs 5] [--quick] [--json]

The state is that of AdamW over the workload's weights: exp_avg and exp_avg_sq in f32 for every
tensor (about 4 GB for the 0.5B shape), built once, resident. Measured:
`apr_trainer.checkpoint.save_state` (streams one tensor at a time into a locked temp file, fsync,
rename, plus the JSON sidecar). Reference: `safetensors.torch.save_file` followed by an fsync, for
the same durability. Times come from one process that alternates the two after a warm-up write of
each (the first multi-GB write of a process is several times slower on a VM, whichever goes first);
RSS is the growth of peak RSS during one save in a fresh process of its own.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as workloads  # noqa: E402
from common import PYTHON, Summary, cache_dir  # noqa: E402
from table import Row, bench_main, time_row  # noqa: E402

GROUP = "training state save (AdamW moments)"
KINDS = {"apr": "apr save_state", "st": "safetensors save_file + fsync"}
_CHILD = r"""
import json, os, resource, sys, time
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from apr_trainer.checkpoint import save_state
weights, folder, runs, kinds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
tensors = {}
with safe_open(weights, "pt") as f:
    for name in f.keys():
        shape = f.get_slice(name).get_shape()
        for moment in ("exp_avg", "exp_avg_sq"):
            tensors[f"optim.{name}.{moment}"] = torch.full(shape, 1e-3, dtype=torch.float32)

def save(kind):
    if kind == "apr":
        save_state(os.path.join(folder, "step.apr"), {"step": 1}, tensors)
    else:
        out = os.path.join(folder, "state.safetensors")
        save_file(tensors, out)
        with open(out, "rb") as fh:
            os.fsync(fh.fileno())

def clean():
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))

seconds = {kind: [] for kind in kinds}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for round in range(runs + 1):  # round 0 warms up
    for kind in kinds:
        start = time.perf_counter()
        save(kind)
        if round:
            seconds[kind].append(time.perf_counter() - start)
        clean()
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"seconds": seconds, "rss_mib": grown, "bytes": sum(t.nbytes for t in tensors.values())}))
"""


def _child(weights: str, folder: Path, runs: int, kinds: list[str]) -> dict:
    proc = subprocess.run([PYTHON, "-c", _CHILD, weights, str(folder), str(runs), ",".join(kinds)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(w: workloads.Workload, runs: int) -> list[Row]:
    """save_state against save_file + fsync: alternating in one process for time, fresh processes for RSS."""
    folder = cache_dir("state")
    timed = _child(w.safetensors, folder, runs, list(KINDS))
    rss = {kind: _child(w.safetensors, folder, 0, [kind])["rss_mib"] for kind in KINDS}
    s = {kind: Summary(name, runs, statistics.median(timed["seconds"][kind]), rss[kind],
                       [round(x, 3) for x in timed["seconds"][kind]]) for kind, name in KINDS.items()}
    return [time_row(GROUP, s["apr"], s["st"], "<= 1.0x", 1.0,
                     note=f"{timed['bytes'] / 1e9:.2f} GB of f32 state; RSS column: growth during one save")]


if __name__ == "__main__":
    bench_main(__doc__, run, runs=5)
