"""The issue-4 falsifier contract and `apr contract check` (schema, test existence, --run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from apr_format.errors import CorruptSource
from apr_testing import ROOT, run_apr
from contract_runner import check_contract, load_contract

CONTRACT = ROOT / "contracts" / "apr-pretrain-arch-polymorphic-v1.yaml"


def test_contract_schema_and_tests_exist():
    """FALSIFY-008: the contract parses, follows the schema, and every test it names exists."""
    report = check_contract(CONTRACT)
    assert report.problems == []
    assert report.contract == "apr-pretrain-arch-polymorphic-v1" and report.ok
    assert [f.id for f in report.falsifiers] == [f"FALSIFY-{i:03d}" for i in range(1, 9)]
    assert all(f.test.startswith("tests/") and f.pins and f.title for f in report.falsifiers)


def test_cli_check_reports_the_contract():
    proc = run_apr("contract", "check", CONTRACT, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] and report["problems"] == [] and len(report["falsifiers"]) == 8
    human = run_apr("contract", "check", CONTRACT)
    assert human.returncode == 0 and "ok (8 falsifiers, 0 problems)" in human.stdout


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _contract(*falsifiers: dict) -> dict:
    return {"contract": "demo", "version": "1", "description": "d", "falsifiers": list(falsifiers)}


def test_schema_problems_are_all_listed(tmp_path):
    broken = {
        "contract": "demo", "falsifiers": [
            {"id": "F-1", "title": "t", "pins": "p", "test": "tests/x.py"},
            {"id": "FALSIFY-002", "title": "", "pins": "p", "test": "tests/x.py::test_a", "extra": 1},
            "not a mapping",
        ],
    }
    _, problems = load_contract(_write(tmp_path / "c.yaml", broken))
    assert problems == [
        "key 'version' must be a str (missing)",
        "key 'description' must be a str (missing)",
        "falsifiers[0]: id 'F-1' is not of the form FALSIFY-001",
        "falsifiers[0]: test 'tests/x.py' is not 'path/to/test_file.py::test_name'",
        "falsifiers[1]: 'title' must be a non-empty string",
        "falsifiers[1]: unknown key 'extra'",
        "falsifiers[2] must be a mapping",
    ]


def test_missing_tests_are_named_and_exit_1(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_demo.py").write_text("def test_here():\n    pass\n\nclass TestK:\n    def test_m(self):\n        pass\n")
    path = _write(tmp_path / "c.yaml", _contract(
        {"id": "FALSIFY-001", "title": "t", "pins": "p", "test": "tests/test_demo.py::test_here[case]"},
        {"id": "FALSIFY-002", "title": "t", "pins": "p", "test": "tests/test_demo.py::TestK::test_m"},
        {"id": "FALSIFY-003", "title": "t", "pins": "p", "test": "tests/test_demo.py::test_gone"},
        {"id": "FALSIFY-004", "title": "t", "pins": "p", "test": "tests/test_nowhere.py::test_x"},
    ))
    report = check_contract(path, root=tmp_path)
    assert report.problems == [
        "FALSIFY-003: tests/test_demo.py defines no test 'test_gone'",
        "FALSIFY-004: test file tests/test_nowhere.py does not exist",
    ]
    proc = run_apr("contract", "check", path, "--root", tmp_path)
    assert proc.returncode == 1
    assert "problem: FALSIFY-003: tests/test_demo.py defines no test 'test_gone'" in proc.stdout


@pytest.mark.parametrize(("text", "problem"), [("falsifiers: [", "not valid YAML"), ("- a\n- b\n", "holds a YAML list")])
def test_unreadable_contract_is_an_error_exit_2(tmp_path, text, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CorruptSource, match=problem):
        load_contract(path)
    proc = run_apr("contract", "check", path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"apr: error: {path}: ") and problem in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_run_reports_pass_and_fail(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_demo.py").write_text(
        "import pytest\n\n"
        "def test_good():\n    assert 1 + 1 == 2\n\n"
        "def test_bad():\n    assert 1 + 1 == 3\n\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_param(n):\n    assert n == 1\n"
    )
    path = _write(tmp_path / "c.yaml", _contract(
        {"id": "FALSIFY-001", "title": "good", "pins": "p", "test": "tests/test_demo.py::test_good"},
        {"id": "FALSIFY-002", "title": "bad", "pins": "p", "test": "tests/test_demo.py::test_bad"},
        {"id": "FALSIFY-003", "title": "all cases", "pins": "p", "test": "tests/test_demo.py::test_param"},
        {"id": "FALSIFY-004", "title": "one case", "pins": "p", "test": "tests/test_demo.py::test_param[1]"},
    ))
    proc = run_apr("contract", "check", path, "--root", tmp_path, "--run", "--json")
    assert proc.returncode == 1, proc.stderr
    results = {f["id"]: f["result"] for f in json.loads(proc.stdout)["falsifiers"]}
    assert results == {"FALSIFY-001": "passed", "FALSIFY-002": "failed", "FALSIFY-003": "failed", "FALSIFY-004": "passed"}
