# `make demo` and `make test` work on a fresh machine: each creates .venv and installs the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
APR := $(VENV)/bin/apr
# torch is pinned so pip does not pull a multi-GB CUDA build where a CPU wheel is at hand;
# override with `make TORCH=torch test` (or any spec) on a GPU machine.
TORCH ?= torch==2.13.0

.PHONY: install test demo bench gpu-check fuzz clean

$(VENV)/.installed-dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed-dev

test: install
	$(PY) -m pytest -q -n auto tests

# The whole path on a checked-in checkpoint: convert -> inspect -> validate -> pretrain --init -> export.
demo: install
	rm -rf demo-out && mkdir -p demo-out
	$(APR) convert fixtures/tiny-qwen2-hf -o demo-out/tiny.apr
	$(APR) inspect demo-out/tiny.apr
	$(APR) validate demo-out/tiny.apr
	$(APR) pretrain --init demo-out/tiny.apr --data fixtures/tiny-corpus.txt -o demo-out/run \
		--steps 60 --batch-size 8 --seq-len 64 --lr 3e-3 --warmup 5 --val-every 20 --device cpu
	$(APR) export demo-out/run/final.apr -o demo-out/hf
	$(APR) diff demo-out/tiny.apr demo-out/run/final.apr; test $$? -le 1

bench: install
	$(PY) benchmarks/run_all.py

# One GPU, under 8 minutes: the cuda-marked tests, then the 0.5B-shaped model at seq 2048 (bf16-mixed;
# eager, compiled, activation checkpointing, FSDP over one rank, transformers' Qwen2 in the same loop).
# Writes gpu-check.json and gpu-check.md. Needs a CUDA torch: `make TORCH=torch gpu-check`; on an offline
# machine whose python3 already has a CUDA torch and the project installed: `make gpu-check PY=python3 INSTALL=`.
INSTALL ?= install
gpu-check: $(INSTALL)
	$(PY) -m pytest -q -p no:cacheprovider -m cuda tests
	$(PY) benchmarks/gpu_check.py --out gpu-check.json --md gpu-check.md

fuzz: install
	APR_FUZZ_CASES=100000 $(PY) -m pytest -q -n auto tests/format/test_fuzz.py tests/reliability/test_fuzz_pipeline.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out gpu-check.json gpu-check.md
