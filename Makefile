# `make demo` and `make test` work on a fresh machine: each creates .venv and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APR := $(VENV)/bin/apr
# torch is pinned so pip does not pull a multi-GB CUDA build where a CPU wheel is at hand;
# override with `make TORCH=torch test` (or any spec) on a GPU machine.
TORCH ?= torch==2.13.0

.PHONY: install test demo bench fuzz clean

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed-dev

test: install
	$(PY) -m pytest -q -n auto tests

demo: install
	bash benchmarks/../scripts/demo.sh

bench: install
	$(PY) benchmarks/run_all.py

fuzz: install
	APR_FUZZ_CASES=100000 $(PY) -m pytest -q tests/format/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
