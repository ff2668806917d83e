# Two commands matter: `make run` (the default pipeline) and `make test` (the quick suite; `make test-all`: every
# test, heavy ones included, what CI runs).
# Both create or update .venv from the pinned lock files; `make install` alone is a no-op when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIPELINE ?= gmm2d

# Offline and quiet: no telemetry from any tool.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export RAY_USAGE_STATS_ENABLED := 0
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-dev run test test-all test-fast bench ui clean help

help:
	@echo "make run      - install, then reproduce the default pipeline ($(PIPELINE)) and print where results are"
	@echo "make test     - install with dev dependencies, then run the quick suite (all but the tests marked heavy)"
	@echo "make test-all - the whole test suite, heavy tests included, with the 25 slowest tests at the end (what CI runs)"
	@echo "make install  - create/update $(VENV) from requirements.lock (quick when nothing changed)"
	@echo "make bench    - time each stage of the default pipeline (writes bench/out/)"
	@echo "make ui       - open the MLflow UI on 127.0.0.1"
	@echo "make clean    - remove data, models, samples, plots and .stein/ (keeps the git-tracked metrics and dvc.lock)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"

# The stamp depends on the lock and the project metadata: it reinstalls only when they change.
$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

$(VENV)/.installed-dev: requirements-dev.lock $(VENV)/.installed
	$(BIN)/python -m pip install -q -r requirements-dev.lock
	touch $@

# The venv hook: a .pth file in the venv's site-packages that puts $(BIN) first on PATH and turns telemetry off in
# every program started from the venv's Python, so that `.venv/bin/dvc` runs the stages' `python` from the venv
# without `source .venv/bin/activate` (tasks/infra/venv_hook.py). Its own stamp: an existing venv gets it too.
$(VENV)/.hook: tasks/infra/venv_hook.py $(VENV)/.installed
	$(BIN)/python -m tasks.infra.venv_hook
	touch $@

# `dvc plots show`'s offline page (.dvc/tmp/, git-ignored; .dvc/config names it): written when missing or stale.
install: $(VENV)/.installed $(VENV)/.hook
	@$(BIN)/python -m tasks.infra.offline_plots > /dev/null

install-dev: $(VENV)/.installed-dev $(VENV)/.hook
	@$(BIN)/python -m tasks.infra.offline_plots > /dev/null

run: install
	$(BIN)/stein run $(PIPELINE)
	@echo "The commands (stein, dvc, prefect, mlflow) are in $(BIN)/: run \`source $(VENV)/bin/activate\` to use them by name."

test: install-dev
	$(BIN)/python -m pytest -m "not heavy"

test-all: install-dev
	$(BIN)/python -m pytest --durations=25

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow and not e2e"

bench: install
	$(BIN)/python bench/bench_pipeline.py

ui: install
	$(BIN)/stein ui

# Removes what the pipelines wrote and the project-local state; keeps what git tracks (metrics/*.json, dvc.lock).
clean:
	rm -rf .stein data models samples plots
