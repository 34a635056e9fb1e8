# The README's two commands: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= hedwig.toml

.PHONY: run test lint typecheck pytest bench bench-accept bench-relay bench-queue bench-rest clean

$(BIN)/hedwigpy: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.test-extras: $(BIN)/hedwigpy
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/hedwigpy
	$(BIN)/hedwigpy serve -c $(CONFIG)

lint: $(VENV)/.test-extras
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test-extras
	$(BIN)/mypy

pytest: $(VENV)/.test-extras
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# Benchmarks against a private Postfix (run as root; see bench/README.md). `make bench` runs them all.
bench: bench-accept bench-relay bench-queue bench-rest

bench-accept: $(VENV)/.test-extras
	$(BIN)/python -m bench.smtp_accept

bench-relay: $(VENV)/.test-extras
	$(BIN)/python -m bench.relay

bench-queue: $(VENV)/.test-extras
	$(BIN)/python -m bench.queue_scale

bench-rest: $(VENV)/.test-extras
	$(BIN)/python -m bench.rest
	$(BIN)/python -m bench.rest_floor

clean:
	rm -rf $(VENV) var/ .mypy_cache .ruff_cache
