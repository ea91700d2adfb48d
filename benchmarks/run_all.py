"""`make bench`: every benchmark row against its reference, measured in the same run, as one table (or JSON).

Usage: .venv/bin/python benchmarks/run_all.py [--quick] [--json] [--only convert,export,...] [--runs N]

The workload (a Qwen2.5-0.5B-shaped bf16 HF checkpoint, its sharded twin and its .apr
conversions, about 4.5 GB) is built once and cached in $APR_BENCH_DIR (default /tmp/apr-bench).
--quick uses a ~12M-parameter model instead (seconds; for smoke runs, not for figures).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata, util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_convert  # noqa: E402
import bench_export  # noqa: E402
import bench_inspect  # noqa: E402
import bench_load  # noqa: E402
import bench_state  # noqa: E402
import bench_tokenize  # noqa: E402
import bench_train  # noqa: E402
import bench_validate  # noqa: E402
import workload as workloads  # noqa: E402
from table import Row, render  # noqa: E402

# name -> (run(workload, runs), default runs, --quick runs)
BENCHES = {
    "convert": (bench_convert.run, 5, 3),
    "export": (bench_export.run, 5, 3),
    "load": (bench_load.run, 5, 3),
    "inspect": (bench_inspect.run, 7, 3),
    "validate": (bench_validate.run, 5, 3),
    "state": (bench_state.run, 5, 3),
    "train": (lambda w, runs: bench_train.run(runs), 7, 3),
    "tokenize": (lambda w, runs: bench_tokenize.run(runs, *bench_tokenize.SIZES[w.name == "quick"]), 3, 1),
}


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "os": platform.platform()}
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["ram_gib"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    info["crc32"] = "zlib-ng" if util.find_spec("zlib_ng") else "zlib (install zlib-ng for a 6x faster CRC)"
    for package in ("torch", "transformers", "safetensors", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~12M-parameter workload, fewer runs (smoke test)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument("--runs", type=int, default=None, help="runs (train: rounds) per measurement")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}")

    began = time.perf_counter()
    info = machine()
    _log(f"workload: building or reusing the {'quick' if args.quick else 'Qwen2.5-0.5B-shaped'} checkpoint ...")
    w = workloads.ensure(args.quick)
    rows: list[Row] = []
    timings = {}
    for name in chosen:
        run, runs, quick_runs = BENCHES[name]
        count = args.runs or (quick_runs if args.quick else runs)
        _log(f"{name}: {count} runs ...")
        started = time.perf_counter()
        rows += run(w, count)
        timings[name] = round(time.perf_counter() - started, 1)
    elapsed = time.perf_counter() - began
    if args.json:
        doc = {"machine": info, "workload": {"name": w.name, "params": w.params, "weights_bytes": w.weights_bytes},
               "elapsed_s": round(elapsed, 1), "bench_seconds": timings, "rows": [r.to_dict() for r in rows]}
        print(json.dumps(doc, indent=1))
        return
    print(f"apr benchmarks: workload {w.name} ({w.params:,} parameters, {w.weights_bytes / 1e6:,.0f} MB bf16)")
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs, {info.get('ram_gib', '?')} GiB RAM; "
          f"load average at start {info.get('load_average_at_start')}; CRC-32 by {info['crc32']}")
    print("figures are medians over runs; page cache warm; ratio = measurement / reference "
          "(tokens/s rows: higher is better)\n")
    print(render(rows))
    missed = [r for r in rows if r.met is False]
    print(f"\n{sum(r.met is True for r in rows)} targets met, {len(missed)} missed; took {elapsed:.0f} s")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
