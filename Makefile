# The two commands a newcomer needs: `make repro` and `make test`.
# Everything runs inside .venv, created on first use from the pinned lock file.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROFILE ?=

# DVC runs each stage's `python ...` through the shell: put the project's venv first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_ENABLE_ASYNC_LOGGING := false
export PYTHONUNBUFFERED := 1

.PHONY: install repro test test-fast lint ui bench clean-outputs

install: $(STAMP)

# Reinstall whenever the pins change. `-c requirements.lock` pins every transitive package, so
# two machines get the same environment; torch==2.13.0 resolves to the local CPU wheel.
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[dev]"
	touch $(STAMP)

# `make repro` runs the default (quick) profile; `make repro PROFILE=paper` first merges the
# params/paper.yaml overlay into params.yaml (see README, "Profiles").
repro: $(STAMP)
	@if [ -n "$(PROFILE)" ]; then $(BIN)/python -m pipeline profile $(PROFILE); fi
	$(BIN)/dvc repro

# One pytest worker per core; a test file stays on one worker (its module fixtures are built once).
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile -m "not e2e"

lint: $(STAMP)
	$(BIN)/ruff check pipeline stages tests bench
	$(BIN)/ruff format --check pipeline stages tests bench

ui: $(STAMP)
	$(BIN)/python -m pipeline ui

bench: $(STAMP)
	$(BIN)/python bench/epg_throughput.py
	$(BIN)/python bench/atari_throughput.py
	$(BIN)/python bench/metagrad_grid.py
