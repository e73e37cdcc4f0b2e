# cellstream developer commands. `make run` and `make test` work on a fresh machine with python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test lint typecheck unit proto bench bench-quick soak fuzz e2e image image-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps record what is installed, so repeated runs skip pip until pyproject.toml changes.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]'
	touch $@

$(VENV)/.bench-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test,bench]'
	touch $@

## Serve the bundled models (default model: demo) on 127.0.0.1:50051, metrics on 127.0.0.1:9095.
## The commands are installed in .venv: call .venv/bin/cellstream, or `. .venv/bin/activate` first.
run: $(VENV)/.run-installed
	$(BIN)/cellstream serve

## Lint, type-check and run the test suite.
test: lint typecheck unit

lint: $(VENV)/.test-installed
	$(BIN)/ruff check service tests proto demo bench
	$(BIN)/ruff format --check service tests proto demo bench

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy
	$(BIN)/mypy --strict bench

unit: $(VENV)/.test-installed
	$(BIN)/pytest

## Regenerate service/cellstream/_proto from proto/ (a test fails when it is stale).
proto: $(VENV)/.test-installed
	$(BIN)/python proto/generate.py

## Benchmarks: cellstream against its transport and compute ceilings and baselines, one JSON line
## per scenario plus a table (about 8 minutes; bench-quick about 2). Results: bench/results/.
bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench

bench-quick: $(VENV)/.bench-installed
	$(BIN)/python -m bench --quick

## Resource attacks on a real server (repeated-id StepBatch, import flood, unread StepStream, idle
## connections): RSS, stalls and status codes, one JSON line per attack plus a table (under a minute).
soak: $(VENV)/.bench-installed
	$(BIN)/python -m bench.soak

## Property-based fuzzing of every RPC on a real server with three tenants: 100,000 messages (MESSAGES=n),
## a fresh seed each run (SEED=n replays one); counts by status code and message kind, then any findings.
fuzz: $(VENV)/.test-installed
	$(BIN)/python tests/fuzzing.py --messages $(or $(MESSAGES),100000) $(if $(SEED),--seed $(SEED))

## cellstream scraped by a real Prometheus (Debian package `prometheus`); every dashboard query returns data.
e2e: $(VENV)/.test-installed
	CELLSTREAM_E2E=1 $(BIN)/pytest tests/e2e

## Build the container image with podman (localhost/cellstream:dev); sets up podman and a local base image first.
image:
	deploy/container/build.sh

## Run the image: health, a stream, /metrics, SIGTERM, snapshot restored in a second container.
image-test: $(VENV)/.run-installed
	deploy/container/image-test.sh $(BIN)/python

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build dist
