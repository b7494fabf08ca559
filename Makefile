# blkserve developer entry points.  Every target that needs the project runs
# the idempotent `setup` first, so a fresh Debian 12 machine needs nothing else.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STATE_DIR ?= $(CURDIR)/var
APT_PACKAGES := build-essential pkg-config liburing-dev python3-venv \
	qemu-system-x86 qemu-utils qemu-system-common fio busybox-static cpio \
	e2fsprogs util-linux clang libclang-rt-14-dev systemtap-sdt-dev prometheus binutils \
	python3-bpfcc linux-headers-amd64 libvirt-daemon-system libvirt-dev libxen-dev \
	fuse3 libfuse3-dev librbd-dev ceph-mon ceph-osd ceph-common qemu-block-extra \
	python3-dev dpkg-dev chromium chromium-driver mmdebstrap systemd-container
NATIVE_SRC := $(wildcard native/*.c native/*.h)
CFLAGS_NATIVE := -O2 -g -Wall -Wextra -Werror -std=gnu11 -Inative

.PHONY: setup apt bpf-env venv run test test-native asan lint clean soak deb

setup: apt bpf-env $(VENV)/.installed

# bcc compiles its programs against kernel headers.  When the running kernel
# ships none, use Debian's (the programs only need the tracepoint and USDT
# definitions, which match): link build/ and source/ of /lib/modules/$(uname -r)
# to the newest linux-headers-*-amd64 / -common.  Also mount tracefs if needed.
bpf-env: apt
	@kver=$$(uname -r); mod=/lib/modules/$$kver; \
	if [ ! -e $$mod/build/include ]; then \
		hdr=$$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1); \
		if [ -n "$$hdr" ]; then \
			mkdir -p $$mod && ln -sfn $$hdr $$mod/build && \
			ln -sfn $${hdr%-amd64}-common $$mod/source && \
			echo "setup: bcc uses $$hdr for kernel $$kver"; \
		fi; \
	fi; \
	if [ ! -d /sys/kernel/tracing/events ]; then \
		mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || \
		echo "setup: cannot mount tracefs: eBPF tracing will be unavailable"; \
	fi

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

# The Debian package: build/deb/blkserve_<version>_amd64.deb (a private
# virtualenv in /opt/blkserve/.venv, the units, the sample config; see
# deploy/debian/build-deb.sh).  DEB_VERSION overrides pyproject's version.
DEB_DIR ?= build/deb
DEB_VERSION ?=
deb: apt
	deploy/debian/build-deb.sh $(DEB_DIR) $(DEB_VERSION)

# The control plane on its embedded defaults: loopback :8470, state in ./var.
run: setup
	$(BIN)/blkserve serve --state-dir $(STATE_DIR)

test: setup test-native
	$(BIN)/ruff check .
	$(BIN)/pytest -v tests

# 16 volumes under blkserve serve, each driven by `blkserve bench --verify`,
# for SOAK_SECONDS (make test runs the same check for 60 s).
SOAK_SECONDS ?= 600
soak: setup
	BLKSERVE_SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/pytest -v tests/test_soak.py

# The engine's own C tests, with the same warnings as the extension.
ENGINE_C := native/mem.c native/virtq.c native/blk.c native/core.c native/qos.c native/engine.c \
	native/ring_split.c native/ring_packed.c native/vq_log.c native/blkif.c native/blkif_req.c \
	native/rbd.c
ENGINE_LIBS := -luring -lrbd -lrados -lpthread
build/test_engine: native/tests/test_engine.c native/tests/util.h $(NATIVE_SRC)
	mkdir -p build
	$(CC) $(CFLAGS_NATIVE) -o $@ native/tests/test_engine.c $(ENGINE_C) $(ENGINE_LIBS)

# The blkif transport against a fake Xen (grant table over a memfd).
build/test_blkif: native/tests/test_blkif.c native/tests/util.h $(NATIVE_SRC)
	mkdir -p build
	$(CC) $(CFLAGS_NATIVE) -o $@ native/tests/test_blkif.c $(ENGINE_C) $(ENGINE_LIBS)

test-native: apt build/test_engine build/test_blkif
	./build/test_engine
	./build/test_blkif

# The engine under AddressSanitizer and UndefinedBehaviorSanitizer: its C
# tests, then the export and adversarial-frontend tests against an export
# whose engine is built with the sanitizers (a copy of the package in
# build/asan-pkg, run from there; libasan preloaded into Python).
ASAN_ENV := ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
asan: setup
	mkdir -p build
	$(CC) $(CFLAGS_NATIVE) -fsanitize=address,undefined -fno-sanitize-recover=all \
		-fno-omit-frame-pointer -o build/test_engine_asan native/tests/test_engine.c \
		$(ENGINE_C) $(ENGINE_LIBS)
	$(CC) $(CFLAGS_NATIVE) -fsanitize=address,undefined -fno-sanitize-recover=all \
		-fno-omit-frame-pointer -o build/test_blkif_asan native/tests/test_blkif.c \
		$(ENGINE_C) $(ENGINE_LIBS)
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		./build/test_engine_asan
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		./build/test_blkif_asan
	rm -rf build/asan-pkg && mkdir -p build/asan-pkg
	cp -r blkserve build/asan-pkg/ && rm -f build/asan-pkg/blkserve/_native*.so
	BLKSERVE_SANITIZE=address,undefined $(BIN)/python blkserve/_native_build.py build/asan-pkg
	cd build/asan-pkg && $(ASAN_ENV) LD_PRELOAD=$$($(CC) -print-file-name=libasan.so) \
		$(CURDIR)/$(BIN)/python -c 'import blkserve._native as n; assert "asan-pkg" in n.__file__, n.__file__'
	# run from build/asan-pkg: `python -m` puts the working directory first on
	# sys.path, so pytest and the exports it starts load the sanitized engine
	cd build/asan-pkg && $(ASAN_ENV) \
		LD_PRELOAD=$$($(CC) -print-file-name=libasan.so):$$($(CC) -print-file-name=libubsan.so) \
		$(CURDIR)/$(BIN)/python -m pytest -q -p no:cacheprovider --rootdir=$(CURDIR) \
		$(CURDIR)/tests/test_export.py $(CURDIR)/tests/test_bench.py $(CURDIR)/tests/test_rbd.py \
		$(CURDIR)/tests/test_bench_blkif.py
	@echo "asan: engine C tests, export/adversarial, bench and RBD tests ran clean under ASan+UBSan"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf build $(VENV) *.egg-info blkserve/_native*.so blkserve/_native.c

# Coverage-guided fuzzing (native/fuzz/, tests/fuzz/): libFuzzer over the
# descriptor-chain walk and request parser, atheris over the vhost-user
# message parsing.  New inputs go to build/fuzz/; crashes are written there
# as crash-*, and the committed seeds stay untouched.
FUZZ_SECONDS ?= 300
FUZZ_CC ?= clang
FUZZ_CFLAGS := -O1 -g -Wall -Wextra -Werror -std=gnu11 -Inative -fno-omit-frame-pointer \
	-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all

build/fuzz/fuzz_chain: native/fuzz/fuzz_chain.c native/mem.c native/virtq.c native/blk.c \
		native/internal.h native/blkserve_native.h
	mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_CFLAGS) -o $@ native/fuzz/fuzz_chain.c native/mem.c \
		native/virtq.c native/blk.c

.PHONY: fuzz fuzz-chain fuzz-protocol
fuzz: fuzz-chain fuzz-protocol

fuzz-chain: apt build/fuzz/fuzz_chain
	mkdir -p build/fuzz/chain-corpus build/fuzz/chain-artifacts
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
		./build/fuzz/fuzz_chain -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
		-artifact_prefix=build/fuzz/chain-artifacts/ build/fuzz/chain-corpus native/fuzz/corpus

fuzz-protocol: setup
	mkdir -p build/fuzz/protocol-corpus build/fuzz/protocol-artifacts
	$(BIN)/python tests/fuzz/fuzz_protocol.py -max_total_time=$(FUZZ_SECONDS) \
		-print_final_stats=1 -artifact_prefix=build/fuzz/protocol-artifacts/ \
		build/fuzz/protocol-corpus tests/fuzz/corpus

# Performance suite (not part of `make test`): blkserve vs qemu-storage-daemon
# vs host fio, ~15 minutes, then the same on a Ceph RBD image (bench/rbd.py,
# ~5 minutes; alone: make bench-rbd); writes bench/results/ and the tables in
# docs/PERFORMANCE.md.  Quick iteration: make bench BENCH_ARGS=--quick
# BENCH_RBD_ARGS=--quick
.PHONY: bench bench-rbd
bench: setup
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/rbd.py $(BENCH_RBD_ARGS)

bench-rbd: setup
	$(BIN)/python bench/rbd.py $(BENCH_RBD_ARGS)
