# Two entry points: `make demo` (the main job) and `make test` (lint, types, the whole suite).
# Both create or refresh .venv from pyproject.toml first; nothing else needs installing by hand
# except Python 3.11, Java 17+ and Maven (for genuine Apache Kafka; without them the local
# broker falls back to noida-db).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint typecheck unit integration bench down clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar on -e '.[build,dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/inflow demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

unit: venv
	$(BIN)/pytest tests/unit

bench: venv
	$(BIN)/inflow engine bench --json bench-engines.json

down: venv
	$(BIN)/inflow dev down

clean: down
	rm -rf .inflow
