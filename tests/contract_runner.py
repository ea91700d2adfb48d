"""Falsifier contracts (development only): load and check a contract YAML, run the tests it names with pytest.

Used by `apr contract check` from a source checkout; tests/ is not installed with the package.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from apr_format.errors import CorruptSource, UnsupportedFeature

FALSIFIER_ID = re.compile(r"^FALSIFY-\d{3}$")
# "tests/x.py::test_name" or "tests/x.py::TestClass::test_name", optional "[param]" on the test.
TEST_REF = re.compile(r"^(?P<file>[^:\s]+\.py)::(?:(?P<cls>[A-Za-z_]\w*)::)?(?P<name>test\w*)(?P<param>\[[^\]]*\])?$")
_TOP_KEYS = {"contract": str, "version": str, "description": str, "falsifiers": list}
_FALSIFIER_KEYS = ("id", "title", "pins", "test")


@dataclass(frozen=True)
class Falsifier:
    """One claim of the contract and the test that would falsify it."""

    id: str
    title: str
    pins: str
    test: str


@dataclass(frozen=True)
class Contract:
    """A parsed contract file."""

    path: str
    contract: str
    version: str
    description: str
    falsifiers: tuple[Falsifier, ...]


@dataclass
class ContractReport:
    """What `check_contract` found; `results` (falsifier id -> "passed"/"failed"/...) only after a run."""

    path: str
    contract: str | None = None
    version: str | None = None
    falsifiers: list[Falsifier] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    results: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and all(r == "passed" for r in self.results.values())

    def to_dict(self) -> dict:
        falsifiers = []
        for f in self.falsifiers:
            entry = {"id": f.id, "title": f.title, "pins": f.pins, "test": f.test}
            if f.id in self.results:
                entry["result"] = self.results[f.id]
            falsifiers.append(entry)
        return {
            "path": self.path, "contract": self.contract, "version": self.version, "ok": self.ok,
            "problems": self.problems, "falsifiers": falsifiers,
        }


def load_contract(path: str | os.PathLike) -> tuple[Contract | None, list[str]]:
    """Parse a contract YAML; returns the contract (None if unusable) and every schema problem.

    Raises:
        CorruptSource: not YAML or not a mapping at the top.
        UnsupportedFeature: PyYAML is not installed.
    """
    try:
        import yaml
    except ImportError:
        raise UnsupportedFeature(path, "reading contracts needs PyYAML (pip install PyYAML)") from None
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CorruptSource(path, "not a text file (not UTF-8), expected a YAML contract") from None
    except yaml.YAMLError as exc:
        raise CorruptSource(path, f"not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise CorruptSource(path, f"holds a YAML {type(data).__name__}, expected a mapping")
    problems = [
        f"key {key!r} must be a {kind.__name__}" + ("" if key in data else " (missing)")
        for key, kind in _TOP_KEYS.items()
        if not isinstance(data.get(key), kind) or (kind is not list and not data.get(key))
    ]
    problems += [f"unknown top-level key {key!r}" for key in data if key not in _TOP_KEYS]
    falsifiers, seen = [], set()
    for i, item in enumerate(data.get("falsifiers") or []):
        where = f"falsifiers[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where} must be a mapping")
            continue
        bad = [k for k in _FALSIFIER_KEYS if not isinstance(item.get(k), str) or not item[k].strip()]
        problems += [f"{where}: {k!r} must be a non-empty string" for k in bad]
        problems += [f"{where}: unknown key {k!r}" for k in item if k not in _FALSIFIER_KEYS]
        if bad:
            continue
        if not FALSIFIER_ID.match(item["id"]):
            problems.append(f"{where}: id {item['id']!r} is not of the form FALSIFY-001")
        if item["id"] in seen:
            problems.append(f"{where}: duplicate id {item['id']!r}")
        seen.add(item["id"])
        if not TEST_REF.match(item["test"]):
            problems.append(f"{where}: test {item['test']!r} is not 'path/to/test_file.py::test_name'")
        falsifiers.append(Falsifier(*(item[k].strip() for k in _FALSIFIER_KEYS)))
    if isinstance(data.get("falsifiers"), list) and not data["falsifiers"]:
        problems.append("'falsifiers' is empty")
    contract = None
    if not problems:
        contract = Contract(os.fspath(path), data["contract"], data["version"], data["description"], tuple(falsifiers))
    return contract, problems


def missing_tests(falsifiers, root: str | os.PathLike) -> list[str]:
    """Problems for tests that do not exist: file absent, or no such test function in it (AST)."""
    problems, defined = [], {}
    for f in falsifiers:
        match = TEST_REF.match(f.test)
        if match is None:
            continue
        file = Path(root) / match["file"]
        if file not in defined:
            defined[file] = _test_names(file) if file.is_file() else None
        names = defined[file]
        wanted = f"{match['cls']}::{match['name']}" if match["cls"] else match["name"]
        if names is None:
            problems.append(f"{f.id}: test file {match['file']} does not exist")
        elif wanted not in names:
            problems.append(f"{f.id}: {match['file']} defines no test {wanted!r}")
    return problems


def _test_names(file: Path) -> set[str]:
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return set()
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    names = set()
    for node in tree.body:
        if isinstance(node, functions):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{item.name}" for item in node.body if isinstance(item, functions))
    return names


def check_contract(path: str | os.PathLike, root: str | os.PathLike | None = None, run: bool = False) -> ContractReport:
    """Validate the schema, check every named test exists under `root`, and optionally run them.

    `root` defaults to the nearest folder above the contract holding pyproject.toml. A run
    calls pytest once in a subprocess (cwd = root) and records each falsifier as passed,
    failed or not run (every parametrised case must pass).
    """
    root = Path(root) if root is not None else project_root(path)
    contract, problems = load_contract(path)
    report = ContractReport(os.fspath(path), problems=problems)
    if contract is None:
        return report
    report.contract, report.version, report.falsifiers = contract.contract, contract.version, list(contract.falsifiers)
    report.problems += missing_tests(contract.falsifiers, root)
    if run and not report.problems:
        report.results = run_tests(contract.falsifiers, root)
    return report


def project_root(path: str | os.PathLike) -> Path:
    """The nearest folder above `path` holding pyproject.toml (else the current directory)."""
    for folder in Path(path).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


def run_tests(falsifiers, root: str | os.PathLike) -> dict[str, str]:
    """Run the falsifiers' tests with pytest; falsifier id -> "passed", "failed", "skipped" or "not run".

    Raises:
        UnsupportedFeature: pytest is not installed.
    """
    if importlib.util.find_spec("pytest") is None:
        raise UnsupportedFeature(None, "running a contract needs pytest (pip install pytest)")
    node_ids = sorted({f.test for f in falsifiers})
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *node_ids],
            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        cases = _junit_cases(junit) if junit.is_file() else {}
    results = {}
    for f in falsifiers:
        match = TEST_REF.match(f.test)
        module = match["file"][: -len(".py")].replace("/", ".")
        classname = f"{module}.{match['cls']}" if match["cls"] else module
        wanted = match["name"] + (match["param"] or "")
        outcomes = [
            outcome for (cls, name), outcome in cases.items()
            if cls == classname and (name == wanted or (not match["param"] and name.startswith(match["name"] + "[")))
        ]
        if not outcomes:
            results[f.id] = "not run"
        elif "failed" in outcomes:
            results[f.id] = "failed"
        else:
            results[f.id] = "passed" if all(o == "passed" for o in outcomes) else "skipped"
    return results


def _junit_cases(junit: Path) -> dict[tuple[str, str], str]:
    cases = {}
    for case in ET.parse(junit).iter("testcase"):
        children = {child.tag for child in case}
        outcome = "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
        cases[(case.get("classname", ""), case.get("name", ""))] = outcome
    return cases
