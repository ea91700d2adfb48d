"""Benchmark `load_init_tensors` (an .apr to CPU torch tensors) against `safetensors.torch.load_file` on the same weights.

Usage: .venv/bin/python benchmarks/bench_load.py [--runs 5] [--quick] [--json]

Each run is a fresh process that imports torch, apr_format and safetensors first, then times the
load call alone (and, in the "+ read" variants, a pass that reads every byte of every tensor).
RSS is the growth of the process's peak RSS during the timed part.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as workloads  # noqa: E402
from common import PYTHON, Summary, measure  # noqa: E402
from table import Row, bench_main, time_row  # noqa: E402

GROUP = "load_init_tensors -> CPU torch"
_CHILD = r"""
import json, resource, sys, time, warnings
import torch
import safetensors.torch
import apr_format
kind, path, touch = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if kind in ("apr", "apr-on-demand"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tensors = apr_format.load_init_tensors(path, on_demand=kind == "apr-on-demand")
else:
    tensors = safetensors.torch.load_file(path)
if touch:
    whole = (t[...] for t in tensors.values())  # StoredRows read here; tensors as they are
    top = max(int(t.view(torch.uint8).max()) for t in whole if t.numel())
seconds = time.perf_counter() - start
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"seconds": seconds, "rss_mib": grown / 1024, "tensors": len(tensors)}))
"""


def _child(kind: str, path: str, touch: bool) -> dict:
    out = subprocess.run([PYTHON, "-c", _CHILD, kind, path, "1" if touch else "0"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summaries(cases: dict[str, tuple[str, str, bool]], runs: int) -> dict[str, Summary]:
    results: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(runs):  # round-robin so background noise spreads over every case
        for name, case in cases.items():
            results[name].append(_child(*case))
    return {
        name: Summary(name, runs, statistics.median(r["seconds"] for r in rs),
                      statistics.median(r["rss_mib"] for r in rs), [round(r["seconds"], 4) for r in rs])
        for name, rs in results.items()
    }


def run(w: workloads.Workload, runs: int) -> list[Row]:
    """The default .apr (aprender's lm_head copy, checked byte for byte), the copy-less .apr, on-demand
    loading (the trainer's), load_file."""
    measure(["cat", w.apr, w.apr_no_copy, w.safetensors])  # warm the page cache
    cases = {
        "load_init_tensors(model.apr)": ("apr", w.apr, False),
        "load_init_tensors(--no-lm-head-copy .apr)": ("apr", w.apr_no_copy, False),
        "safetensors load_file": ("st", w.safetensors, False),
        "load_init_tensors(model.apr) + read all": ("apr", w.apr, True),
        "load_init_tensors(model.apr, on_demand=True) + read all": ("apr-on-demand", w.apr, True),
        "safetensors load_file + read all": ("st", w.safetensors, True),
    }
    s = _summaries(cases, runs)
    ref, ref_read = s["safetensors load_file"], s["safetensors load_file + read all"]
    note = "RSS column: growth during the call"
    return [
        time_row(GROUP, s["load_init_tensors(model.apr)"], ref, "<= 1.0x", 1.0,
                 note="includes the byte check of the lm_head copy; " + note),
        time_row(GROUP, s["load_init_tensors(--no-lm-head-copy .apr)"], ref, "<= 1.0x", 1.0, note=note),
        time_row(GROUP, s["load_init_tensors(model.apr) + read all"], ref_read, "<= 1.0x", 1.0,
                 note="then one pass over every tensor's bytes"),
        time_row(GROUP, s["load_init_tensors(model.apr, on_demand=True) + read all"], ref_read, "<= 1.0x", 1.0,
                 note="what the trainer does: checked at load, each tensor read with pread when asked for"),
    ]


if __name__ == "__main__":
    bench_main(__doc__, run, runs=5)
