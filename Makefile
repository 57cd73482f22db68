# Set-up and entry points. `make demo` and `make test` work on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test quick system-deps lint

# torch is installed first and pinned so pip takes the local CPU wheel and never a CUDA build.
$(BIN)/scaling: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

install: $(BIN)/scaling

demo: install
	$(BIN)/scaling demo

# Debian packages for the end-to-end tests: a local Slurm (scripts/local-slurm.sh) and headless Chromium.
system-deps:
	bash scripts/system-deps.sh

# The whole suite, slow and end-to-end tests included, with a real single-node Slurm on localhost.
test: install system-deps
	bash scripts/local-slurm.sh start
	$(BIN)/pytest -m "" ; status=$$?; bash scripts/local-slurm.sh stop; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# The quick loop (under 5 minutes): no slow or end-to-end tests.
quick: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check scaling tests benchmarks
