# The two Quickstart commands (see README): `make demo` and `make test`.
# Each creates .venv and installs the project into it on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU wheel by default; GPU users: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' ...
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true
export PYTHONUNBUFFERED := 1

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15

# ruff (lint + format check, rules in pyproject.toml) over the tree, mypy over the files pyproject lists.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench.models

clean:
	rm -rf $(VENV) .torch_extensions
