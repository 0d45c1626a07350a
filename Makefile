# Tollway: `make run` starts the gateway, `make test` runs everything CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: run test lint fmt typecheck bench install clean

$(STAMP): pyproject.toml
	@echo "Installing Tollway and its dependencies into $(VENV)/ (the first time takes about a minute)..."
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[embedded,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tollway serve --migrate --demo

lint: $(STAMP)
	$(VENV)/bin/ruff format --check proxy tests bench
	$(VENV)/bin/ruff check proxy tests bench

fmt: $(STAMP)
	$(VENV)/bin/ruff format proxy tests bench
	$(VENV)/bin/ruff check --fix proxy tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tollway .pytest_cache .mypy_cache .ruff_cache
