# One virtual environment, made on first use; every target goes through it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint pretrain bench docs gpu-check gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

pretrain: setup
	$(PY) scripts/pretrain.py --config simclr_lars.yaml

bench: setup
	$(PY) scripts/bench_optim.py

docs: setup
	$(PY) -m ssl_toolkit.config_reference README.md

# A CUDA machine's own python3 (torch installed), no virtual environment: the repository on
# PYTHONPATH, the packages it lacks installed from .whl/ (scripts/gpu_check.py).
gpu-check:
	@PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} python3 scripts/gpu_check.py

# Where the package registries can be reached: .whl/ for gpu-check (scripts/gpu_wheels.py).
gpu-wheels: setup
	$(PY) scripts/gpu_wheels.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
