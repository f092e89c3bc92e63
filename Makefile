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
	rm -rf out/demo.results.csv out/demo.results.csv.journal out/demo.results.csv.run.json \
		out/demo.results.csv.before
	@echo "== 1. allo-batch run: 292 sample corrections against an embedded sandbox with faults"
	$(BIN)/allo-batch run sample_data/corrections.csv --sandbox \
		--sandbox-world sample_data/world.json --sandbox-rate 50 \
		--sandbox-faults latency=20ms,jitter=10ms,500=0.02,503=0.02,drop=0.01 --sandbox-seed 7 \
		--output out/demo.results.csv --no-progress || test $$? -eq 1
	@echo
	@echo "== 2. allo-batch report --failed: the rows a person must fix"
	$(BIN)/allo-batch report out/demo.results.csv --failed --show 5 --input sample_data/corrections.csv
	@echo
	@echo "The demo succeeded. Its exit code 1 is on purpose: the sample file holds 8 invalid rows"
	@echo "(an SMS id, blank content, a bad template, conflicting duplicates) and 4 the API refuses"
	@echo "(unknown call, missing or wrong template), so the result file shows how each is reported."
	@echo "Results: out/demo.results.csv; before-images: out/demo.results.csv.before/"

lint: $(STAMP)
	$(BIN)/ruff format --check allo_batch tests scripts jobs
	$(BIN)/ruff check allo_batch tests scripts jobs
	$(BIN)/mypy --strict allo_batch
	$(BIN)/mypy --strict --explicit-package-bases tests

## All tests: formatting, lint, types, then pytest.
test: lint
	@test -n "$$ALLO_BATCH_SKIP_AIRFLOW" || test -x .venv-airflow/bin/airflow || echo \
		"note: the first run installs Apache Airflow (about 300 MB) into .venv-airflow for the" \
		"DAG tests; ALLO_BATCH_SKIP_AIRFLOW=1 skips them"
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks

clean:
	rm -rf $(VENV) .venv-airflow out .mypy_cache .ruff_cache .pytest_cache .hypothesis
