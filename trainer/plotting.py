"""Training curves from runs' metrics.jsonl drawn with matplotlib (the optional `plot` extra): one panel per metric, runs overlaid."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from apr_format.atomic import replacing
from apr_format.errors import CorruptSource, InvalidArgument, MissingDependency

METRICS_FILE = "metrics.jsonl"  # trainer.train.METRICS_FILE (not imported from there: it pulls in torch)
DEFAULT_METRICS = ("loss", "val_loss", "lr", "tokens_per_s")
X_FIELDS = {"step": "step", "tokens": "tokens_seen"}  # --x choice -> metrics.jsonl field
INSTALL_HINT = "pip install 'apr-toolkit[plot]'"


@dataclass(frozen=True)
class Curve:
    """One metric of one run: the points drawn."""

    run: str
    metric: str
    x: list[float]
    y: list[float]


@dataclass
class Plot:
    """What `plot_runs` drew: the matplotlib Figure, its curves, and notes for the user (points left out)."""

    figure: Any
    curves: list[Curve]
    notes: list[str] = field(default_factory=list)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of RUN_DIR/metrics.jsonl. A last line without its newline (a run writing it right now)
    is left out; any other line that is not a JSON object is an error.

    Raises:
        FileNotFoundError: no metrics.jsonl in `run_dir`.
        CorruptSource: a line in the middle is not a JSON object.
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILE)
    with open(path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1] is "" or a line still being written
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise CorruptSource(path, f"line {number} is not a JSON object")
        records.append(record)
    return records


def curves_of(run: str, records: list[dict[str, Any]], metric: str, x: str) -> tuple[Curve, int]:
    """The points of `metric` against `x` ("step" or "tokens"); also how many values were left out
    (null or non-finite, e.g. a skipped step)."""
    xs, ys, dropped = [], [], 0
    for record in records:
        if metric not in record or X_FIELDS[x] not in record:
            continue
        value, at = record[metric], record[X_FIELDS[x]]
        if _finite(value) and _finite(at):
            xs.append(float(at))
            ys.append(float(value))
        else:
            dropped += 1
    return Curve(run, metric, xs, ys), dropped


def plot_runs(run_dirs: list[str | os.PathLike], metrics: list[str] | None = None, x: str = "step") -> Plot:
    """A figure with one panel per metric (shared x axis), each run one line with its folder as the label.

    `metrics` None: DEFAULT_METRICS, leaving out (with a note) those no run logged yet.

    Raises:
        MissingDependency: matplotlib is not installed.
        InvalidArgument: an unknown `x`, or a metric named in `metrics` that no run logged.
        FileNotFoundError, CorruptSource: from `read_metrics`.
    """
    if x not in X_FIELDS:
        raise InvalidArgument("--x", f"{x!r} is not one of {', '.join(X_FIELDS)}")
    if metrics is not None and not metrics:
        raise InvalidArgument("--metric", "name at least one metric")
    figure_class = _figure_class()
    runs = {_label(os.fspath(r), run_dirs): read_metrics(r) for r in run_dirs}
    notes = []
    if metrics is None:
        metrics = [m for m in DEFAULT_METRICS if any(_finite(r.get(m)) for rs in runs.values() for r in rs)]
        notes = [f"no run logged {m} yet: no panel" for m in DEFAULT_METRICS if m not in metrics]
        if not metrics:
            raise InvalidArgument(run_dirs[0], f"{METRICS_FILE} holds none of {', '.join(DEFAULT_METRICS)} yet")
    plot = Plot(figure_class(figsize=(8, 2.6 * len(metrics)), layout="constrained"), [], notes)
    axes = plot.figure.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    for ax, metric in zip(axes, metrics, strict=True):
        for label, records in runs.items():
            curve, dropped = curves_of(label, records, metric, x)
            if dropped:
                plot.notes.append(f"{label}: {dropped} {metric} value(s) are null or not finite and are not drawn")
            if curve.x:
                marker = "o" if len(curve.x) < 30 else None  # a handful of val_loss points stays visible
                ax.plot(curve.x, curve.y, label=label, marker=marker, markersize=3)
                plot.curves.append(curve)
        if not ax.lines:
            known = sorted({k for records in runs.values() for r in records for k in r if k != X_FIELDS[x]})
            raise InvalidArgument("--metric", f"no run logged {metric!r} (logged: {', '.join(known) or 'nothing'})")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1].set_xlabel("tokens seen" if x == "tokens" else "optimizer step")
    return plot


def check_png_path(path: str | os.PathLike) -> None:
    """Raise InvalidArgument unless `path` ends in .png (so a typo never replaces a model file)."""
    if not os.fspath(path).lower().endswith(".png"):
        raise InvalidArgument(path, "the plot is a PNG: give a file name ending in .png")


def save_png(plot: Plot, path: str | os.PathLike) -> None:
    """Write the figure as a PNG, atomically (an existing PNG is replaced). Raises as `check_png_path`."""
    check_png_path(path)
    with replacing(path) as out:
        plot.figure.savefig(out, format="png", dpi=100)


def _figure_class():
    """matplotlib's Figure (drawn with Agg, without pyplot's global state), or a MissingDependency error."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependency(None, f"apr plot needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure


def _label(run: str, runs: list[str | os.PathLike]) -> str:
    """The folder's name, or its whole path when another run has the same name."""
    name = os.path.basename(os.path.normpath(run))
    same = sum(os.path.basename(os.path.normpath(os.fspath(r))) == name for r in runs)
    return name if same == 1 else run


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
