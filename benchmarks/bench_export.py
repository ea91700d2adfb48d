"""Benchmark `apr export` (.apr -> HF folder) against `cp` and a safetensors load_file + save_file round trip.

Usage: .venv/bin/python benchmarks/bench_export.py [--runs 3] [--quick] [--json]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as workloads  # noqa: E402
from common import APR, PYTHON, measure, medians  # noqa: E402
from table import Row, bench_main, rss_row, time_row  # noqa: E402

GROUP = "apr export .apr -> HF"
ROUND_TRIP = (
    "import sys\nfrom safetensors.torch import load_file, save_file\n"
    "save_file(load_file(sys.argv[1]), sys.argv[2], metadata={'format': 'pt'})\n"
)


def run(w: workloads.Workload, runs: int) -> list[Row]:
    """Export the converted .apr (with aprender's lm_head copy, checked and dropped) to an HF folder."""
    env = {**os.environ, "NO_COLOR": "1"}
    shard = workloads.SHARD_SIZE["quick" if w.name == "quick" else "full"]
    measure(["cat", w.apr, w.safetensors], env=env)  # warm the page cache: every tool reads from memory
    with tempfile.TemporaryDirectory(dir=os.path.dirname(w.apr)) as tmp:
        out = Path(tmp)

        def clean() -> None:
            for path in out.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.sync()  # settle writeback so one run's dirty pages do not slow the next

        copy, synced = str(out / "copy.safetensors"), str(out / "synced.safetensors")
        commands = {
            "apr export": lambda: measure([APR, "export", w.apr, "-o", str(out / "hf"), "--quiet"], env=env),
            f"apr export --max-shard-size {shard}": lambda: measure(
                [APR, "export", w.apr, "-o", str(out / "hf"), "--quiet", "--max-shard-size", shard], env=env),
            "cp": lambda: measure(["cp", w.safetensors, copy], env=env),
            "cp + sync": lambda: measure(["sh", "-c", 'cp "$0" "$1" && sync "$1"', w.safetensors, synced], env=env),
            "safetensors load+save": lambda: measure(
                [PYTHON, "-c", ROUND_TRIP, w.safetensors, str(out / "st.safetensors")], env=env),
        }
        export, sharded, cp, cp_sync, st = medians(commands, runs, clean)
    note = "export fsyncs; cp and save_file do not"
    rows = []
    for s in (export, sharded):
        rows += [
            time_row(GROUP, s, cp, "<= 2x cp", 2.0, note=note),
            time_row(GROUP, s, cp_sync, note="like for like: both durable on disk"),
            time_row(GROUP, s, st, "< 1x safetensors round trip", 1.0),
            rss_row(GROUP, s, w.weights_bytes, "model size", 0.25),
        ]
    return rows


if __name__ == "__main__":
    bench_main(__doc__, run, runs=3)
