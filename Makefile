# The two commands: `make dev` runs the whole stack, `make test` runs the whole test suite.
# Both create .venv and install the project with its dev extras first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev test bench lint format install clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required: set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

dev: install
	$(BIN)/iiot dev

# two workers, a test file each at a time: the tests wait on brokers, subprocesses and the
# database as much as they compute (about 8 min on the 2-core development machine)
test: install
	$(BIN)/pytest -n 2 --dist loadfile

bench: install
	$(BIN)/python -m benchmarks

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .coverage .coverage.*
