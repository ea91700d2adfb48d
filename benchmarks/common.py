"""Shared benchmark helpers: a cache folder, per-child wall time and peak RSS, medians, table/JSON output."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
APR = str(Path(sys.executable).with_name("apr"))


def cache_dir(name: str) -> Path:
    """A folder under $APR_BENCH_DIR (default /tmp/apr-bench) kept between runs."""
    folder = Path(os.environ.get("APR_BENCH_DIR", "/tmp/apr-bench")) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass(frozen=True)
class Measurement:
    """One child process: wall seconds and peak resident set size in bytes."""

    wall_s: float
    peak_rss: int


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None) -> Measurement:
    """Run `cmd` and return its own wall time and peak RSS (os.wait4 gives that child's rusage,
    unlike RUSAGE_CHILDREN which is the maximum over every child so far)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {stderr.strip()}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return Measurement(wall, usage.ru_maxrss * scale)


@dataclass(frozen=True)
class Summary:
    """Median of several measurements of one command."""

    name: str
    runs: int
    wall_s: float
    peak_rss_mib: float
    walls: list[float]


def medians(
    commands: dict[str, Callable[[], Measurement]], runs: int, cleanup: Callable[[], None] | None = None
) -> list[Summary]:
    """Run every command `runs` times, round-robin so background noise spreads over all of them
    (calling `cleanup` after each run), and keep each command's medians."""
    results: dict[str, list[Measurement]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, once in commands.items():
            results[name].append(once())
            if cleanup is not None:
                cleanup()
    return [
        Summary(
            name=name, runs=runs, wall_s=statistics.median(r.wall_s for r in rs),
            peak_rss_mib=statistics.median(r.peak_rss for r in rs) / 2**20, walls=[round(r.wall_s, 3) for r in rs],
        )
        for name, rs in results.items()
    ]


def report(title: str, summaries: list[Summary], extra: dict | None = None, *, as_json: bool = False,
           baseline: str | None = None) -> None:
    """Print a table (or one JSON document) of the summaries with ratios against `baseline`."""
    base = next((s for s in summaries if s.name == baseline), None)
    rows = []
    for s in summaries:
        row = asdict(s)
        if base is not None:
            row["time_vs_" + base.name] = s.wall_s / base.wall_s
            row["rss_vs_" + base.name] = s.peak_rss_mib / base.peak_rss_mib
        rows.append(row)
    if as_json:
        print(json.dumps({"benchmark": title, **(extra or {}), "results": rows}, indent=2))
        return
    from tabulate import tabulate

    print(title)
    for key, value in (extra or {}).items():
        print(f"  {key}: {value}")
    headers = ["command", "median wall s", "median peak RSS MiB"]
    if base is not None:
        headers += [f"time / {base.name}", f"RSS / {base.name}"]
    table = []
    for s, row in zip(summaries, rows):
        line = [s.name, f"{s.wall_s:.2f}", f"{s.peak_rss_mib:.0f}"]
        if base is not None:
            line += [f"{row['time_vs_' + base.name]:.2f}x", f"{row['rss_vs_' + base.name]:.2f}x"]
        table.append(line)
    print(tabulate(table, headers=headers, disable_numparse=True))
