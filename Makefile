# splitrelay: `sudo make test`, `sudo make bench`, `sudo make demo`.
# Every target bootstraps what it needs (idempotent, fast the second time).
# Works as root directly or through sudo.

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: bootstrap test lint bench demo clean

bootstrap:
	$(SUDO) env SPLITRELAY_VENV=$(VENV) ctl/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check ctl transceiver tests vagrant
	$(VENV)/bin/ruff format --check ctl transceiver tests vagrant

test: bootstrap lint
	$(SUDO) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: bootstrap
	$(SUDO) $(PY) -m ctl.bench

demo: bootstrap
	$(SUDO) $(VENV)/bin/relayctl demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
