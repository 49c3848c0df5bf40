# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck unit clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "optrack needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# `make demo SERVE=1` keeps the dashboard up after the demo, until Ctrl-C.
demo: $(BIN)/.installed
	$(BIN)/optrack demo $(if $(SERVE),--serve)

lint: $(BIN)/.installed
	$(BIN)/ruff format --check worker tests migrations bench
	$(BIN)/ruff check worker tests migrations bench
	$(BIN)/lint-imports

typecheck: $(BIN)/.installed
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

# The tests without a database or a process: seconds.
unit: $(BIN)/.installed
	$(BIN)/pytest tests/unit

clean:
	rm -rf .optrack .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .hypothesis
