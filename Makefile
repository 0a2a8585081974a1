# Every target creates or updates .venv as needed; a new machine needs only Python 3.11+ and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-serial fuzz bench lint typecheck clean

$(STAMP): pyproject.toml
	@echo "==> creating the virtual environment in $(VENV) (first run only)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(PY) -m pip install --progress-bar on --upgrade pip
	@echo "==> installing persistence-sidecar and its dependencies into $(VENV) (about a minute on a fresh machine)"
	$(PY) -m pip install --progress-bar on -e '.[dev,analysis,docs]'
	@echo "==> $(VENV) is ready"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m persistence demo

# The whole suite in two pytest processes at once (tests/support/shards.py); test-serial runs it in one.
test: $(STAMP)
	$(PY) -m tests.support.shards

test-serial: $(STAMP)
	$(PY) -m pytest

# Property and model tests with random seeds and 20x the examples (make test runs them derandomized).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_breaker.py tests/test_journal.py tests/test_sidecar_model.py \
		tests/test_models.py tests/test_columns.py tests/test_versions_model.py

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
