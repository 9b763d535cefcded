# Two commands do all set-up on a fresh machine:
#   make run    create .venv, install iotcls, classify the bundled sample capture
#   make test   create .venv, install iotcls, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAMPLE := iotcls/data/sample.pcap
# The sample's devices, by MAC, from the CSV shipped beside it.
SAMPLE_DEVICES = $(shell tail -n +2 iotcls/data/sample-devices.csv | cut -d, -f1 | paste -sd, -)

$(BIN)/iotcls: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: run test bench
run: $(BIN)/iotcls
	$(BIN)/iotcls classify $(SAMPLE) --devices $(SAMPLE_DEVICES) -o out

test: $(BIN)/iotcls
	$(BIN)/python -m pytest -q

bench: $(BIN)/iotcls
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done
