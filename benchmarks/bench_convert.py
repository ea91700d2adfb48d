"""Benchmark `apr convert` (HF -> .apr) on a Qwen2.5-0.5B-shaped bf16 checkpoint against `cp` and safetensors load+save.

Usage: .venv/bin/python benchmarks/bench_convert.py [--runs 3] [--quick] [--json]
The checkpoint (about 1 GB, single file and sharded) is built once under $APR_BENCH_DIR
(default /tmp/apr-bench) by benchmarks/workload.py.
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

GROUP = "apr convert HF -> .apr"
GROUP_SHARDED = "apr convert sharded HF -> .apr"
# load_file + save_file of every weight file given (one for a single-file checkpoint).
_SAFETENSORS_ROUND_TRIP = (
    "import os, sys\nfrom safetensors.torch import load_file, save_file\n"
    "for src in sys.argv[2:]:\n"
    "    save_file(load_file(src), os.path.join(sys.argv[1], os.path.basename(src)), metadata={'format': 'pt'})\n"
)


def _weights(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def _measure_folder(source: str, out: Path, runs: int) -> dict:
    """apr convert (with and without the lm_head copy), cp, cp + sync and the safetensors round trip."""
    env = {**os.environ, "NO_COLOR": "1"}
    weights = _weights(source)
    measure(["cat", *weights], env=env)  # warm the page cache so every tool reads from memory

    def clean() -> None:
        for path in out.iterdir():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.sync()  # settle writeback so one run's dirty pages do not slow the next

    def fresh(name: str) -> str:
        folder = out / name
        folder.mkdir(exist_ok=True)
        return str(folder)

    apr = [APR, "convert", source, "-o", str(out / "m.apr"), "--quiet"]
    commands = {
        "apr convert": lambda: measure(apr, env=env),
        "apr convert --no-lm-head-copy": lambda: measure([*apr, "--no-lm-head-copy"], env=env),
        "cp": lambda: measure(["cp", *weights, fresh("cp")], env=env),
        # apr's writer fsyncs before its atomic rename; this is the like-for-like copy
        "cp + sync": lambda: measure(["sh", "-c", 'd="$1"; shift; cp "$@" "$d" && sync "$d"/*', "sh",
                                      fresh("sync"), *weights], env=env),
        "safetensors load+save": lambda: measure(
            [PYTHON, "-c", _SAFETENSORS_ROUND_TRIP, fresh("st"), *weights], env=env
        ),
    }
    return {s.name: s for s in medians(commands, runs, clean)}


def run(w: workloads.Workload, runs: int) -> list[Row]:
    """Rows for the single-file and the sharded checkpoint."""
    rows = []
    with tempfile.TemporaryDirectory(dir=os.path.dirname(w.apr)) as tmp:
        for group, source in ((GROUP, w.hf), (GROUP_SHARDED, w.hf_sharded)):
            s = _measure_folder(source, Path(tmp), runs)
            apr, no_copy = s["apr convert"], s["apr convert --no-lm-head-copy"]
            copy_note = "writes aprender's lm_head copy: 27% more bytes than cp; fsyncs, cp does not"
            rows += [
                time_row(group, apr, s["cp"], "<= 2x cp", 2.0, note=copy_note),
                time_row(group, apr, s["cp + sync"], note="like for like: both durable on disk"),
                time_row(group, no_copy, s["cp"], "<= 2x cp", 2.0, note="same bytes as cp; fsyncs"),
                time_row(group, apr, s["safetensors load+save"], "< 1x safetensors round trip", 1.0),
                rss_row(group, apr, w.weights_bytes, "model size", 0.25),
            ]
    return rows


if __name__ == "__main__":
    bench_main(__doc__, run, runs=3)
