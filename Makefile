# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install iotcls, classify the bundled sample capture
#   make test   create .venv, install iotcls, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := iotcls/data/sample.pcap

$(BIN)/iotcls: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: run test bench
run: $(BIN)/iotcls
	$(BIN)/iotcls extract $(SAMPLE) --local-nets 10.0.0.0/8,192.168.0.0/16 -o out/sample-dataset.npz

test: $(BIN)/iotcls
	$(BIN)/python -m pytest -q

bench: $(BIN)/iotcls
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
