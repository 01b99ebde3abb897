# splitrelay: `sudo make test`, `sudo make bench`, `sudo make demo`.
# Every target bootstraps what it needs (idempotent, fast the second time).
# Works as root directly or through sudo.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
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

# Four benchmarks, each measuring its alternatives side by side in one run (about 25
# minutes in all); JSON reports in bench-results/. BENCH_ARGS goes to the data-plane one.
bench: bootstrap
	mkdir -p bench-results
	$(SUDO) $(VENV)/bin/relayctl bench --output bench-results/xdp.json $(BENCH_ARGS)
	$(SUDO) $(PY) -m ctl.bench_redis --sessions 100000 --json | tee bench-results/redis.json
	$(SUDO) $(PY) -m transceiver.bench --out bench-results/transceiver.json
	$(SUDO) $(PY) -m transceiver.bench_latency --out bench-results/latency.json

demo: bootstrap
	$(SUDO) $(VENV)/bin/relayctl demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
