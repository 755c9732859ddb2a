# The two commands a newcomer runs: `make run` and `make test`. Both set themselves up.
SHELL := /bin/bash
# Debian's own Python 3.11, not a per-user one: the systemd unit's ProtectHome= hides /root.
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := libsystemd-dev pkg-config python3-dev python3-venv gcc rsync b3sum git tar attr libimage-exiftool-perl btrfs-progs bindfs e2fsprogs util-linux sqlite3 postgresql
DEMO ?= demo
TW_DEMO = $(BIN)/treewatch --config $(DEMO)/config.toml
SEED ?= 1
DURATION ?= 60
PYTEST_ARGS ?=

.PHONY: run test lint bench torture deps clean

$(BIN)/.installed: pyproject.toml Makefile
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

deps: $(BIN)/.installed

run: deps
	$(BIN)/python -m daemon.demo "$(DEMO)"
	$(TW_DEMO) scan
	$(TW_DEMO) status
	@echo
	@echo "Now watching $$(realpath $(DEMO))/library (Ctrl-C stops). In another shell, try:"
	@echo "  touch $(DEMO)/library/new.jpg; mv $(DEMO)/library/scans $(DEMO)/library/scanned"
	@echo "  $(TW_DEMO) changes --since 0 | tail"
	@echo "  $(TW_DEMO) status"
	@echo
	$(TW_DEMO) run

lint: deps
	$(BIN)/ruff check daemon tests bench
	$(BIN)/ruff format --check daemon tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: deps
	$(BIN)/python -m bench.run

torture: deps
	$(BIN)/pytest tests/test_torture.py --torture-seed=$(SEED) --torture-duration=$(DURATION)

clean:
	rm -rf $(VENV) demo .mypy_cache .ruff_cache .pytest_cache
