# Two commands for a newcomer: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install dev run test lint bench clean

install: $(BIN)/statsd-server

$(BIN)/statsd-server: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

dev: $(VENV)/.dev-installed

$(VENV)/.dev-installed: $(BIN)/statsd-server
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

api_requests.log: | $(BIN)/statsd-server
	$(BIN)/python tools/generator.py api_requests.log 10000

run: install api_requests.log
	$(BIN)/statsd-server serve --load api_requests.log

test: dev
	$(BIN)/python -m pytest

LINT_PATHS := statsd_server sketches persistence tools tests bench loadtest

lint: dev
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
