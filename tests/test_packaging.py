"""The wheel ships apr_format, apr_cli, apr_converters, apr_trainer with every sub-package, nothing generic."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from apr_testing import ROOT

# source folder -> import name (pyproject.toml [tool.setuptools.package-dir])
PACKAGE_DIRS = {"apr_format": "apr_format", "cli": "apr_cli", "converters": "apr_converters", "trainer": "apr_trainer"}
SKIP = shutil.ignore_patterns(".venv", ".git", "tests", "fixtures", "build", "dist", "*.egg-info", "__pycache__",
                              ".hypothesis", ".pytest_cache", "demo-out", "*.apr")


def _expected_packages() -> set[str]:
    """Every folder with an __init__.py under the four package folders, as its installed import path."""
    found = set()
    for folder, name in PACKAGE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                found.add("/".join((name, *init.parent.relative_to(ROOT / folder).parts)))
    return found


def test_wheel_contents(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)  # build a copy: never touch the working tree's build/
    if not (source / "README.md").exists():
        (source / "README.md").write_text("apr\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "out"),
         str(source)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = (tmp_path / "out").glob("apr_toolkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"apr_format", "apr_cli", "apr_converters", "apr_trainer"}, top_level
    expected = _expected_packages()
    assert {"apr_format", "apr_cli", "apr_converters", "apr_trainer"} <= expected
    shipped = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    assert expected <= shipped, f"sub-packages missing from the wheel: {sorted(expected - shipped)}"
    for folder, name in PACKAGE_DIRS.items():  # every module, not only the __init__s
        for module in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in module.parts and (module.parent / "__init__.py").exists():
                assert "/".join((name, *module.relative_to(ROOT / folder).parts)) in names, module
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "apr = apr_cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
