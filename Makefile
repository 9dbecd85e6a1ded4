# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_TEST := $(VENV)/.installed-test
STAMP_BASE := $(VENV)/.installed-base
# two pytest-xdist workers: the CI machine's 2 cores (the trained demo is built once and shared, tests/conftest.py);
# `make test PYTEST_ARGS=` runs serially
PYTEST_ARGS ?= -n 2

.PHONY: demo test install install-test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools

$(STAMP_BASE): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(STAMP_TEST): setup.py | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@ $(STAMP_BASE)

install: $(STAMP_BASE)
install-test: $(STAMP_TEST)

demo: $(STAMP_BASE)
	$(BIN)/python -m pixart_jax.demo --workdir workdir_demo

test: $(STAMP_TEST)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP_TEST)
	$(BIN)/python bench/headline.py

clean:
	rm -rf $(VENV) workdir_demo .pytest_cache
