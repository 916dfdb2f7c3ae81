# rocketrec: every target bootstraps .venv itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint unit e2e clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py deploy/fbgemm_gpu_cpu_stub/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel (an unpinned torch pulls a CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	# the stub makes torchrec's `fbgemm-gpu` requirement resolve to the CPU build
	$(BIN)/pip install -q ./deploy/fbgemm_gpu_cpu_stub
	# builds the fused serving operator (setup.py) against the torch installed above
	$(BIN)/pip install -q 'setuptools>=68' wheel
	$(BIN)/pip install -q --no-build-isolation -e '.[cpu,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check rocketrec jobs tests benchmarks
	$(BIN)/ruff format --check rocketrec jobs tests benchmarks
	$(BIN)/mypy rocketrec

test: lint
	$(BIN)/python -m pytest -q -n 2 --durations=15 tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not e2e and not dist"

demo: $(STAMP)
	bash deploy/demo.sh

clean:
	rm -rf $(VENV) build runs demo_out deploy/cpp/build
