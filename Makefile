# One virtual environment, made on first use; every target goes through it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint pretrain bench docs clean

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
