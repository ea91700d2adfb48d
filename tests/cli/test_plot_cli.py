"""`apr plot` on real finished runs: a PNG with every logged point, runs overlaid (no matplotlib: test_cli_faults)."""

from __future__ import annotations

from pathlib import Path

import pytest

from apr_testing import FIXTURES, read_metrics, run_apr
from apr_trainer.plotting import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two finished 4-step runs of the tiny preset on the fixture corpus (different learning rates)."""
    root = tmp_path_factory.mktemp("plot")
    out = []
    for name, lr in (("a", "3e-3"), ("b", "1e-3")):
        run = root / name
        run_apr("pretrain", "--arch", "tiny", "--tokenizer", FIXTURES / "tiny-qwen2-hf" / "tokenizer.json",
                "--data", FIXTURES / "tiny-corpus.txt", "--out", run, "--steps", "4", "--val-every", "2",
                "--lr", lr, "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "-q", check=True)
        out.append(run)
    return out


def test_plot_writes_a_png(runs, tmp_path):
    out = tmp_path / "curves.png"
    proc = run_apr("plot", *runs, "-o", out, check=True)
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert proc.stdout.startswith(f"{out}: 4 panel(s), 2 run(s)")


def test_figure_holds_every_logged_point(runs):
    plot = plot_runs(runs, ["loss", "val_loss"], x="tokens")
    loss_ax, val_ax = plot.figure.axes
    for ax, metric in ((loss_ax, "loss"), (val_ax, "val_loss")):
        assert [line.get_label() for line in ax.lines] == ["a", "b"]
        for line, run in zip(ax.lines, runs, strict=True):
            records = [r for r in read_metrics(run) if metric in r]
            assert list(line.get_xdata()) == [r["tokens_seen"] for r in records]
            assert list(line.get_ydata()) == [r[metric] for r in records]
    assert len(val_ax.lines[0].get_xdata()) == 3  # step 0, 2 and 4
    assert plot.notes == []
