# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install iotcls, classify a synthetic home network (iotcls demo)
#   make test   create .venv, install iotcls, lint (ruff check, ruff format --check), run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/iotcls: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: run test bench
run: $(BIN)/iotcls
	$(BIN)/iotcls demo -o out

test: $(BIN)/iotcls
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

bench: $(BIN)/iotcls
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
