"""Rows of the benchmark table (a measurement against its reference, with the issue's target) and their rendering."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from common import Summary


@dataclass
class Row:
    """One line of the table: `value` of the measurement against `ref_value` of its reference.

    `unit` says what the values are ("s" wall time, "MiB" peak RSS, "tok/s"); `ratio` is
    value / ref_value; `met` is None when the row has no target or was skipped.
    """

    group: str
    measurement: str
    reference: str
    unit: str
    value: float | None
    ref_value: float | None
    target: str = ""
    met: bool | None = None
    rss_mib: float | None = None  # the measurement's median peak RSS
    ref_rss_mib: float | None = None
    note: str = ""
    runs: list[float] = field(default_factory=list)  # every run of the measurement (its unit)
    ref_runs: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ref_value:
            return None
        return self.value / self.ref_value

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def skipped(group: str, measurement: str, reference: str, why: str, target: str = "") -> Row:
    """A row that could not run here (e.g. no CUDA): shown with its reason instead of figures."""
    return Row(group, measurement, reference, "", None, None, target, None, note=f"skipped: {why}")


def time_row(group: str, s: Summary, ref: Summary, target: str = "", limit: float | None = None,
             note: str = "") -> Row:
    """Wall-time ratio of two summaries; `met` is ratio <= `limit` when a limit is given."""
    row = Row(group, s.name, ref.name, "s", s.wall_s, ref.wall_s, target, None, s.peak_rss_mib, ref.peak_rss_mib,
              note, list(s.walls), list(ref.walls))
    if limit is not None:
        row.met = row.ratio <= limit
    return row


def rss_row(group: str, s: Summary, budget_bytes: int, what: str, fraction: float) -> Row:
    """Peak RSS of `s` against a budget of `fraction` of `budget_bytes` (e.g. 25% of the model)."""
    budget_mib = budget_bytes / 2**20
    row = Row(group, f"{s.name} peak RSS", what, "MiB", s.peak_rss_mib, budget_mib,
              f"<= {fraction:.0%} of {what}", None, s.peak_rss_mib)
    row.met = s.peak_rss_mib <= fraction * budget_mib
    return row


def render(rows: list[Row]) -> str:
    """The human table: one line per row, ratios and targets side by side."""
    from tabulate import tabulate

    lines = []
    for r in rows:
        if r.value is None:
            lines.append([r.group, r.measurement, "-", "-", r.reference, "-", "-", r.target, "-", r.note])
            continue
        value, ref = _fmt(r.value, r.unit), _fmt(r.ref_value, r.unit)
        rss = "" if r.rss_mib is None or r.unit == "MiB" else f"{r.rss_mib:.0f}"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        met = {True: "yes", False: "NO", None: ""}[r.met]
        lines.append([r.group, r.measurement, value, rss, r.reference, ref, ratio, r.target, met, r.note])
    headers = ["row", "measurement", "median", "RSS MiB", "reference", "ref median", "ratio", "target", "met",
               "note"]
    return tabulate(lines, headers=headers, disable_numparse=True)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:,.0f} {unit}"


def bench_main(doc: str, run: Callable[[Any, int], list[Row]], runs: int) -> None:
    """The command line of a workload benchmark: --runs, --quick, --json; prints its rows."""
    import workload as workloads

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--quick", action="store_true", help="the small workload")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    rows = run(workloads.ensure(args.quick), args.runs)
    print(json.dumps([r.to_dict() for r in rows], indent=1) if args.json else render(rows))
