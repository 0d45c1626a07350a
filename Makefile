# Tollway: `make run` starts the gateway, `make test` runs everything CI runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
BENCH_ARGS ?=

.PHONY: run test lint fmt typecheck bench install clean test-tools

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

# Debian tools some tests run: promtool (the alert rules) and pgbouncer (the
# billing path behind a pooler). Installed when missing (CI runs as root);
# policy-rc.d keeps the packages from starting their own daemons, and the
# tests start pgbouncer themselves on a free loopback port.
TEST_TOOLS := promtool:prometheus pgbouncer:pgbouncer
test-tools:
	@missing=""; for pair in $(TEST_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages the tests need:$$missing"; \
	  if [ -e /usr/sbin/policy-rc.d ]; then made=""; else \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made=1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; }; rc=$$?; \
	  [ -z "$$made" ] || rm -f /usr/sbin/policy-rc.d; \
	  [ $$rc -eq 0 ] || { echo "could not install$$missing (needs root and Debian's apt)"; exit 1; }; \
	fi

test: $(STAMP) test-tools lint typecheck
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tollway .pytest_cache .mypy_cache .ruff_cache
