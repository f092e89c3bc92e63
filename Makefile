PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,sandbox]'
	touch $(STAMP)

## Run the whole job on the sample corrections against an embedded sandbox (with some faults).
demo: $(STAMP)
	mkdir -p out
	rm -f out/demo.results.csv out/demo.results.csv.journal out/demo.results.csv.run.json
	$(BIN)/allo-batch run sample_data/corrections.csv --sandbox \
		--sandbox-world sample_data/world.json --sandbox-rate 50 \
		--sandbox-faults latency=20ms,jitter=10ms,500=0.02,503=0.02,drop=0.01 --sandbox-seed 7 \
		--output out/demo.results.csv --no-progress || test $$? -eq 1
	$(BIN)/allo-batch report out/demo.results.csv

lint: $(STAMP)
	$(BIN)/ruff format --check allo_batch tests scripts jobs
	$(BIN)/ruff check allo_batch tests scripts jobs
	$(BIN)/mypy --strict allo_batch

## All tests: formatting, lint, types, then pytest.
test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks

clean:
	rm -rf $(VENV) .venv-airflow out .mypy_cache .ruff_cache .pytest_cache .hypothesis
