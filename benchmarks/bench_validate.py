"""Benchmark `apr validate` (structure, footer CRC, NaN/Inf scan of every tensor) against `cp` of the same file.

Usage: .venv/bin/python benchmarks/bench_validate.py [--runs 5] [--quick] [--json]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as workloads  # noqa: E402
from common import APR, measure, medians  # noqa: E402
from table import Row, bench_main, time_row  # noqa: E402

GROUP = "apr validate (CRC + NaN scan)"


def run(w: workloads.Workload, runs: int) -> list[Row]:
    """`apr validate` and `cp` of the same .apr, round-robin, page cache warm."""
    env = {**os.environ, "NO_COLOR": "1"}
    measure(["cat", w.apr], env=env)  # warm the page cache: both sides read from memory
    with tempfile.TemporaryDirectory(dir=os.path.dirname(w.apr)) as tmp:
        copy = os.path.join(tmp, "copy.apr")

        def clean() -> None:
            if os.path.exists(copy):
                os.unlink(copy)
            os.sync()  # settle writeback so one run's dirty pages do not slow the next

        commands = {
            "apr validate": lambda: measure([APR, "validate", w.apr], env=env),
            "cp": lambda: measure(["cp", w.apr, copy], env=env),
        }
        validate, cp = medians(commands, runs, clean)
    size = os.path.getsize(w.apr)
    return [time_row(GROUP, validate, cp, "<= 3x cp", 3.0, note=f"{size / 1e6:,.0f} MB .apr; cp writes a copy")]


if __name__ == "__main__":
    bench_main(__doc__, run, runs=5)
