"""`apr contract check` (development only): validate a falsifier contract, check its tests exist, optionally run them.

The runner lives in the checkout's tests/contract_runner.py: a contract pins tests, and tests/ is
not installed with the package, so the command works from a source checkout (`make install`) only.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click

from apr_format.errors import UnsupportedFeature

from .main import EXIT_CHECK_FAILED
from .render import echo_json, escape, table


@click.group("contract")
def contract_cmd() -> None:
    """Falsifier contracts (contracts/*.yaml): claims pinned to the tests that would falsify them."""


@contract_cmd.command("check")
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option("--run", "run", is_flag=True, help="Also run every referenced test with pytest and report pass/fail.")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Project folder the test paths are relative to (default: nearest folder with pyproject.toml).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def check_cmd(path: str, run: bool, root: str | None, as_json: bool) -> None:
    """Check FILE's schema and that every test it names exists. Exit 0 ok, 1 problems or failed tests, 2 unreadable."""
    if run:
        click.echo("running the contract's tests with pytest...", err=True)
    report = _runner().check_contract(path, root=root, run=run)
    if as_json:
        echo_json(report.to_dict())
    else:
        _render(path, report)
    if not report.ok:
        raise click.exceptions.Exit(EXIT_CHECK_FAILED)


def _runner() -> ModuleType:
    """tests/contract_runner.py of the source checkout this apr_cli is installed from.

    Raises:
        UnsupportedFeature: apr was installed from a wheel, without the tests.
    """
    runner = Path(__file__).resolve().parents[1] / "tests" / "contract_runner.py"
    if not runner.is_file():
        raise UnsupportedFeature(
            None, "apr contract is a development command: run it from a source checkout (make install)"
        )
    spec = importlib.util.spec_from_file_location("contract_runner", runner)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _render(path: str, report) -> None:
    ran = bool(report.results)
    if report.falsifiers:
        rows = [(f.id, f.title, f.test, *([report.results.get(f.id, "")] if ran else [])) for f in report.falsifiers]
        click.echo(table(rows, ("id", "title", "test", *(["result"] if ran else []))))
        click.echo()
    for problem in report.problems:
        click.echo(f"problem: {escape(problem)}")
    passed = sum(r == "passed" for r in report.results.values())
    summary = f"{len(report.falsifiers)} falsifiers, {len(report.problems)} problems"
    summary += f", {passed}/{len(report.results)} passed" if ran else ""
    click.echo(f"{escape(path)}: {'ok' if report.ok else 'FAILED'} ({summary})")
