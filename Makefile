# Two entry points (see README): `make demo` and `make test`. Both are idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := swtpm swtpm-tools tpm2-tools libtss2-dev libssl-dev xenstore-utils xen-utils-4.17 strace qemu-system-x86 \
                build-essential pkg-config python3-dev python3-venv libxen-dev clang-14 libclang-rt-14-dev \
                systemd
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint crash fuzz soak bench clean
SOAK_CYCLES ?= 120
# Test workers: most of a test's time is spent waiting on its simulated host's processes, so three
# workers keep two cores busy.  Each worker's hosts, TPMs and ports are its own.  The Xen-trap hosts
# (test_real_xen.py) run on their own afterwards: beside two other workers, the guest of the host
# whose xenconsoled the console test stops was seen gone (3 of 3 runs; never alone) — open in
# docs/reliability.md until its cause is found.
TEST_WORKERS ?= 3
FUZZ_SECONDS ?= 20

# The simulated vtpmmgr is Xen 4.17's manager with the checkpoint extension, built natively
# (vtpmmgr/README.md): the first build fetches Xen's source from Debian into a cache outside the tree.
setup: $(STAMP)
	$(MAKE) -s -C vtpmmgr

# System packages first: tpm2-pytss builds against libtss2-dev, the C extension links libcrypto.
$(STAMP): setup.py pyproject.toml $(wildcard cext/*.py cext/*.c cext/*.h)
	@if [ "$$(dpkg-query -W -f='$${Status}\n' $(APT_PACKAGES) 2>/dev/null | grep -c 'install ok installed')" = "$(words $(APT_PACKAGES))" ]; then \
	    echo "system packages: present"; \
	else \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	fi
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel cffi
	$(PY) -m pip install -q -e '.[test,bench,fuzz,lint]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/xen-vtpm demo

# The architecture contracts first (seconds), then the suite.
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --ignore=tests/test_real_xen.py
	$(PY) -m pytest -q tests/test_real_xen.py

# Architecture (import-linter contracts in pyproject.toml), lint (ruff) and types (mypy).
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The rest of the crash-at-every-step and tamper matrices (make test runs a representative subset).
crash: setup
	$(PY) -m pytest -q -m crash_full

# Snapshot/rollback/delete cycles on one guest; fails on growth in fds, memory or processes.
soak: setup
	$(PY) bench/soak.py --cycles $(SOAK_CYCLES) --every 10

# Coverage-guided fuzzing of every parser, FUZZ_SECONDS per target (11 targets, two of them the C request parsers); findings go to fuzz-findings/.
fuzz: setup
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS)

bench: setup
	$(PY) bench/hashing.py
	$(PY) bench/tpm_ops.py
	$(PY) bench/snapshot.py --sizes 1
	$(PY) bench/migrate.py --sizes 1

clean:
	rm -rf build *.egg-info xen_vtpm/_hashing*.so xen_vtpm/_hashing.c
	$(MAKE) -C vtpmmgr clean
