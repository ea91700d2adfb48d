"""Benchmark `apr inspect` as a whole process against `python -c pass`, and check that it never imports torch.

Usage: .venv/bin/python benchmarks/bench_inspect.py [--runs 7] [--quick] [--json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload as workloads  # noqa: E402
from common import APR, PYTHON, measure, medians  # noqa: E402
from table import Row, bench_main, time_row  # noqa: E402

GROUP = "apr inspect (whole process)"
LIMIT_S = 0.3
# Runs the real CLI in-process, then reports which heavy modules it loaded.
_PROBE = (
    "import contextlib, io, json, sys\nfrom apr_cli.main import cli\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    cli.main(sys.argv[1:], standalone_mode=False)\n"
    "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)))\n"
)


def heavy_imports(*args: str) -> list[str]:
    """Heavy modules `apr ARGS` loads (empty is what we want)."""
    out = subprocess.run([PYTHON, "-c", _PROBE, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(w: workloads.Workload, runs: int) -> list[Row]:
    """`apr inspect` of the .apr and of the sharded HF folder, `python -c pass` as the floor."""
    env = {**os.environ, "NO_COLOR": "1"}
    commands = {
        "apr inspect model.apr": lambda: measure([APR, "inspect", w.apr], env=env),
        "apr inspect --json model.apr": lambda: measure([APR, "inspect", "--json", w.apr], env=env),
        "apr inspect hf-sharded/": lambda: measure([APR, "inspect", w.hf_sharded], env=env),
        "python -c pass": lambda: measure([PYTHON, "-c", "pass"], env=env),
        "python -c 'import torch'": lambda: measure([PYTHON, "-c", "import torch"], env=env),
    }
    apr, apr_json, hf, floor, torch = medians(commands, runs)
    rows = []
    for s, args in ((apr, (w.apr,)), (apr_json, ("--json", w.apr)), (hf, (w.hf_sharded,))):
        heavy = heavy_imports("inspect", *args)
        row = time_row(GROUP, s, floor, f"< {LIMIT_S} s, no torch import",
                       note=f"imports {', '.join(heavy)}" if heavy else "torch not imported")
        row.met = s.wall_s < LIMIT_S and not heavy
        rows.append(row)
    rows.append(time_row(GROUP, torch, floor, note="what importing torch alone would cost"))
    return rows


if __name__ == "__main__":
    bench_main(__doc__, run, runs=7)
