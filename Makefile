# The two commands a newcomer runs: `make run` and `make test`. Both set themselves up.
SHELL := /bin/bash
# Debian's own Python 3.11, not a per-user one: the systemd unit's ProtectHome= hides /root.
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
DEBS := libsystemd-dev pkg-config python3-dev python3-venv gcc rsync b3sum git tar attr
DEMO_DIR ?= demo/library
DEMO_DB ?= demo/index.db
SEED ?= 1
DURATION ?= 60
PYTEST_ARGS ?=

.PHONY: run test lint bench torture deps clean

$(BIN)/.installed: pyproject.toml
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
	$(BIN)/python -m daemon.demo "$(DEMO_DIR)"
	$(BIN)/treewatch --db "$(DEMO_DB)" scan --root "$$(realpath $(DEMO_DIR))"
	$(BIN)/treewatch --db "$(DEMO_DB)" status

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
