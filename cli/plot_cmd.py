"""`apr plot`: training curves of one or more run folders (metrics.jsonl) as one PNG."""

from __future__ import annotations

import click

from apr_trainer.plotting import DEFAULT_METRICS, X_FIELDS, check_png_path, plot_runs, save_png

from .render import escape


@click.command("plot")
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR...")
@click.option("-o", "--output", default="curves.png", show_default=True, metavar="FILE.png",
              help="The PNG to write (replaced if it exists).")
@click.option("--metric", "metrics", default=None, metavar="NAMES",
              help="Comma-separated metrics.jsonl fields, one panel each (e.g. loss,val_loss,grad_norm). "
                   f"Default: {','.join(DEFAULT_METRICS)}, less those no run logged yet.")
@click.option("--x", "x_axis", type=click.Choice(list(X_FIELDS)), default="step", show_default=True,
              help="Horizontal axis: optimizer step, or tokens seen (compares runs of different batch sizes).")
def plot_cmd(run_dirs: tuple[str, ...], output: str, metrics: str | None, x_axis: str) -> None:
    """Draw the curves of RUN_DIR/metrics.jsonl, several runs overlaid, one panel per metric.

    Needs matplotlib: pip install 'apr-toolkit[plot]'.

    Example: apr plot runs/a runs/b -o curves.png --metric loss,val_loss --x tokens
    """
    check_png_path(output)
    names = None if metrics is None else [m.strip() for m in metrics.split(",") if m.strip()]
    plot = plot_runs(list(run_dirs), names, x_axis)
    save_png(plot, output)
    for note in plot.notes:
        click.echo(f"note: {escape(note)}", err=True)
    click.echo(f"{escape(output)}: {len(plot.figure.axes)} panel(s), {len(run_dirs)} run(s), "
               f"{sum(len(c.x) for c in plot.curves):,} points")
