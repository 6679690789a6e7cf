# KeyGrid developer and CI entry points. Every target is safe to run again.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory
.ONESHELL:

# The venv's interpreter: Debian's python3 (3.11+, built with PGO and LTO: keygridd runs about a
# third faster on it than on a plain source build of the same version) when it can make a venv,
# else the first python3 on PATH.
PYTHON ?= $(shell /usr/bin/python3 -c 'import ensurepip, sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 \
	&& echo /usr/bin/python3 || echo python3)
VENV := .venv
STAMP := $(VENV)/.keygrid-installed
# The wheel as it ships (the request path compiled by mypyc, hatch_build.py), unpacked: the tests run its
# daemon a second time and the benchmarks measure it (KEYGRIDD_COMPILED).
COMPILED := build/compiled
PY_DIRS := $(wildcard keygridd tests tools bench)
SHELL_SCRIPTS = .ci/run $(shell find . \( -path ./.git -o -path ./$(VENV) -o -path ./var \) -prune -o -type f \( -name '*.sh' -o -name '*.bash' \) -print)
UNITS := systemd/keygridd.service systemd/keygridd.socket
BENCH_ARGS ?=

# Debian packages the tests need (some for later work: the C shim, SoftHSM2,
# p11-kit, OpenSSL engine and PostgreSQL integration tests).
DEB_PACKAGES := shellcheck systemd libp11-kit-dev softhsm2 opensc gnutls-bin \
	libengine-pkcs11-openssl p11-kit gcc libssl-dev clang clang-format libclang-rt-14-dev xxd \
	python3-venv python3-dev postgresql podman runc fuse-overlayfs uidmap slirp4netns debootstrap

SHIM := keygrid_pkcs11_shim
COMPILED_SUITES := tests/conformance tests/consumers tests/integration/test_bad_input.py tests/integration/test_compiled.py
C_SOURCES = $(filter-out $(SHIM)/keygrid-calls.h,$(wildcard $(SHIM)/*.c $(SHIM)/*.h $(SHIM)/tests/*.c $(SHIM)/tests/*.h $(SHIM)/fuzz/*.c))

.PHONY: help venv deps shim compiled run lint test test-slow bench fuzz clean

help:
	@echo "make venv       create .venv and install keygrid with the test extra (editable)"
	@echo "make deps       install the Debian packages the tests need (root; no-op when present)"
	@echo "make run        start a development keygridd on var/run/keygrid.sock (config in var/)"
	@echo "make shim       build libkeygrid-pkcs11.so (keygrid_pkcs11_shim/build/)"
	@echo "make compiled   build the wheel (mypyc-compiled request path) and unpack it in build/compiled"
	@echo "make lint       ruff, mypy --strict, clang-format, shellcheck, systemd-analyze verify"
	@echo "make test       deps + venv + lint, then every test except the slow ones"
	@echo "make test-slow  the tests marked slow"
	@echo "make bench      RPC, PKCS#11 and software-token benchmarks (BENCH_ARGS='--seconds 5')"
	@echo "make fuzz       fuzz the shim's reply decoder for FUZZ_SECONDS (default 600)"
	@echo "make clean      remove .venv, build output and caches (keeps var/, the dev token)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	if [ ! -x $(VENV)/bin/python ]; then $(PYTHON) -m venv $(VENV); fi
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

deps:
	@missing=""
	for pkg in $(DEB_PACKAGES); do
		status=$$(dpkg-query -W -f='$${db:Status-Status}' "$$pkg" 2>/dev/null || true)
		[ "$$status" = installed ] || missing="$$missing $$pkg"
	done
	if [ -z "$$missing" ]; then echo "deps: all Debian packages present"; exit 0; fi
	if [ "$$(id -u)" -ne 0 ]; then echo "deps: missing:$$missing (run 'sudo make deps')" >&2; exit 1; fi
	echo "deps: installing$$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends $$missing

# The libraries also go where the editable install has them (keygridd/lib), so a rebuild is what runs.
shim:
	$(MAKE) -C $(SHIM)
	install -d keygridd/lib
	install -m 0755 $(SHIM)/build/libkeygrid-pkcs11.so $(SHIM)/build/libkeygrid-worker.so keygridd/lib/
	if [ -f $(SHIM)/build/libkeygrid-signer.so ]; then install -m 0755 $(SHIM)/build/libkeygrid-signer.so keygridd/lib/; fi

compiled: $(COMPILED)/.built

$(COMPILED)/.built: $(STAMP) hatch_build.py pyproject.toml $(shell find keygridd $(SHIM) -name '*.py' -o -name '*.[ch]')
	rm -rf $(COMPILED) build/dist
	$(VENV)/bin/pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir build/dist .
	$(VENV)/bin/python -m zipfile -e build/dist/keygrid-*.whl $(COMPILED)
	test -f $(COMPILED)/keygridd/server/connection.cpython-*.so  # mypyc did compile it
	touch $@

run: venv shim
	$(VENV)/bin/python tools/devsetup.py var/
	exec $(VENV)/bin/keygridd --config var/keygrid.yaml

# systemd-analyze verify only warns (exit 0) on unknown keys and bad values:
# any output is a failure. ExecStart= must name an existing file, so it checks
# a copy of the units that runs /usr/bin/true instead of the installed daemon.
lint: venv
	$(VENV)/bin/ruff check $(PY_DIRS)
	$(VENV)/bin/ruff format --check $(PY_DIRS)
	$(VENV)/bin/mypy --strict keygridd
	clang-format --dry-run --Werror $(C_SOURCES)
	shellcheck $(SHELL_SCRIPTS)
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT
	cp $(UNITS) "$$tmp/"
	sed -i 's#^ExecStart=/usr/bin/keygridd#ExecStart=/usr/bin/true#' "$$tmp/keygridd.service"
	out=$$(cd "$$tmp" && systemd-analyze verify --man=no $(addprefix ./,$(notdir $(UNITS))) 2>&1) || { echo "$$out" >&2; exit 1; }
	if [ -n "$$out" ]; then echo "$$out" >&2; exit 1; fi
	echo "lint: ok"

# The shim's C tests run under AddressSanitizer and UBSan; its reply decoder is fuzzed briefly.
# Then the daemon-level suites again, against the daemon as the wheel ships it (compiled).
test: deps venv shim lint compiled
	$(MAKE) -C $(SHIM) check fuzz-short pytest-asan
	$(VENV)/bin/pytest -q -m "not slow and not compiled"
	KEYGRIDD_COMPILED=$(COMPILED) $(VENV)/bin/pytest -q -m "not slow" $(COMPILED_SUITES)

# pytest exits 5 when no test is selected; that is not a failure here.
test-slow: deps venv
	rc=0; $(VENV)/bin/pytest -q -m slow || rc=$$?
	if [ "$$rc" -eq 5 ]; then echo "test-slow: no slow tests collected"; exit 0; fi
	exit "$$rc"

# keygridd as the wheel ships it (compiled).
bench: venv shim compiled
	export KEYGRIDD_COMPILED=$(COMPILED)
	$(VENV)/bin/python bench/bench_rpc.py $(BENCH_ARGS)
	$(VENV)/bin/python bench/bench_pkcs11.py $(BENCH_ARGS)
	$(VENV)/bin/python bench/bench_pkcs11.py --provider pkcs11 --ops ecdsa-p256-sign rsa2048-sign random-32 $(BENCH_ARGS)
	$(VENV)/bin/python bench/bench_store.py $(BENCH_ARGS)

fuzz:
	$(MAKE) -C $(SHIM) fuzz

clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis ./*.egg-info
	find . \( -path ./.git -o -path ./var \) -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf
