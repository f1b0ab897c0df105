# Two entry points: `make demo` (the main job) and `make test` (lint, types, the whole suite).
# Both create or refresh .venv (the build and dev extras) from pyproject.toml first; nothing else
# needs installing by hand except Python 3.11, a JDK 17+ and Maven (for genuine Apache Kafka and
# Elasticsearch; without them the local services fall back to noida-db).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv lint typecheck unit integration bench serving-size down clean

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

# The serving install (the wheel, no extras) in a throwaway virtualenv, and its size.
serving-size: venv
	@d=$$(mktemp -d) && $(BIN)/python -m pip wheel --no-deps --no-build-isolation -q -w $$d/dist . \
	  && $(PYTHON) -m venv $$d/venv && $$d/venv/bin/pip install -q $$d/dist/inflow-*.whl \
	  && echo "serving install: $$(du -sh $$d/venv | cut -f1)   (this .venv with build+dev: $$(du -sh $(VENV) | cut -f1))" \
	  ; rm -rf $$d

down: venv
	$(BIN)/inflow dev down

clean: down
	rm -rf .inflow
