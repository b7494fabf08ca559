# blkserve developer entry points.  Every target that needs the project runs
# the idempotent `setup` first, so a fresh Debian 12 machine needs nothing else.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE_DIR ?= $(CURDIR)/var
APT_PACKAGES := build-essential pkg-config liburing-dev python3-venv \
	qemu-system-x86 qemu-utils qemu-system-common fio busybox-static cpio \
	e2fsprogs util-linux
NATIVE_SRC := $(wildcard native/*.c native/*.h)
CFLAGS_NATIVE := -O2 -g -Wall -Wextra -Werror -std=gnu11 -Inative

.PHONY: setup apt venv run test test-native asan lint clean

setup: apt $(VENV)/.installed

# Install only what is missing, so a warm machine does no network round-trip.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "setup: installing Debian packages:" $$missing; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py blkserve/_native_build.py $(NATIVE_SRC)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/python -c 'import blkserve._native'
	touch $@

run: setup
	$(BIN)/python -m blkserve.demo --state-dir $(STATE_DIR)

test: setup test-native
	$(BIN)/ruff check .
	$(BIN)/pytest -v tests

# The engine's own C tests, with the same warnings as the extension.
build/test_engine: native/tests/test_engine.c $(NATIVE_SRC)
	mkdir -p build
	$(CC) $(CFLAGS_NATIVE) -o $@ native/tests/test_engine.c native/mem.c \
		native/virtq.c native/blk.c native/engine.c -luring -lpthread

test-native: apt build/test_engine
	./build/test_engine

# Same tests under AddressSanitizer and UndefinedBehaviorSanitizer.
asan: apt
	mkdir -p build
	$(CC) $(CFLAGS_NATIVE) -fsanitize=address,undefined -fno-omit-frame-pointer \
		-o build/test_engine_asan native/tests/test_engine.c native/mem.c \
		native/virtq.c native/blk.c native/engine.c -luring -lpthread
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		./build/test_engine_asan

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf build $(VENV) *.egg-info blkserve/_native*.so blkserve/_native.c
