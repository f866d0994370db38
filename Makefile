# hammal: `make run` starts the mirror on embedded defaults, `make test` runs
# the whole trial suite. Both install what they need on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
SYSTEM_PACKAGES := redis-server docker-registry skopeo curl golang-go iproute2 util-linux chromium chromium-driver containerd podman tinyproxy haproxy
SYSTEM_BINARIES := redis-server docker-registry skopeo curl go ip unshare chromium chromedriver containerd ctr podman tinyproxy haproxy
export PYTHONPATH := $(CURDIR)
# Large socket buffers make glibc map and unmap memory constantly; these keep
# it from doing so (see README, "Performance").
export MALLOC_MMAP_THRESHOLD_ ?= 4194304
export MALLOC_TRIM_THRESHOLD_ ?= 67108864

HAMMAL_ARGS ?=

.PHONY: all deps system-deps develop run test test-unit test-integration lint bench bench-quick bench-deps clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	touch $@

deps: $(VENV)/.installed

system-deps:
	@missing=""; for b in $(SYSTEM_BINARIES); do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages for:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# An editable install that twistd can see: setuptools' default editable mode
# hides twisted/plugins/hammal_plugin.py from Twisted's plugin scan (which
# walks sys.path); compat mode puts this directory on sys.path instead.
develop: deps
	$(BIN)/pip install --quiet --no-deps -e . --config-settings editable_mode=compat

run: deps
	$(BIN)/twistd --pidfile= -n hammal $(HAMMAL_ARGS)

test: deps system-deps
	$(BIN)/trial --reporter=text tests

test-unit: deps
	$(BIN)/trial $$(cd tests && ls test_*.py | sed 's/\.py$$//; s/^/tests./')

test-integration: deps system-deps
	$(BIN)/trial tests.integration

# Benchmark: hammal vs nginx proxy_pass vs Distribution (see bench/README.rst).
BENCH_PACKAGES := docker-registry nginx skopeo wrk curl
BENCH_BINARIES := docker-registry nginx skopeo wrk curl
BENCH_ARGS ?=

bench-deps:
	@missing=""; for b in $(BENCH_BINARIES); do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages for:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $(BENCH_PACKAGES); \
	fi

bench: deps bench-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The cold-blob rows only (a 64 MiB blob, one run): for iterating on the cold path.
bench-quick: deps bench-deps
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

lint: deps
	$(BIN)/ruff check hammal twisted tests bench tools
	$(BIN)/ruff format --check hammal twisted tests bench tools
	$(BIN)/mypy hammal twisted/plugins/hammal_plugin.py

clean:
	rm -rf $(VENV) _trial_temp twisted/plugins/dropin.cache
