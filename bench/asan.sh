#!/bin/bash
# Run blkserve bench's C frontend (native/bench.c) under AddressSanitizer,
# UndefinedBehaviorSanitizer and LeakSanitizer, without Python: a small
# driver (bench/asan_driver.c) against blkserve export and qemu-storage-daemon,
# over every workload, --verify, indirect descriptors, polling and not, plus
# bad configurations and a missing socket.  Exit status 0 = all clean.
#   bench/asan.sh            (from the repository root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d /tmp/bsasan-XXXXXX)
BIN=$WORK/asan_driver
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

${CC:-cc} -O1 -g -Wall -Wextra -Werror -std=gnu11 -Inative \
    -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -o "$BIN" bench/asan_driver.c native/bench.c -lpthread
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1

truncate -s 64M "$WORK/disk.img"
"$PY" -m blkserve export "$WORK/disk.img" --socket "$WORK/bs.sock" --queues 2 \
    >"$WORK/export.log" 2>&1 &
pids+=($!)
socks=("$WORK/bs.sock")
if command -v qemu-storage-daemon >/dev/null; then
    truncate -s 64M "$WORK/qsd.img"
    qemu-storage-daemon --blockdev "driver=file,node-name=f0,filename=$WORK/qsd.img,cache.direct=on,aio=io_uring" \
        --export "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$WORK/qsd.sock,writable=on,num-queues=2" \
        >"$WORK/qsd.log" 2>&1 &
    pids+=($!)
    socks+=("$WORK/qsd.sock")
fi
for s in "${socks[@]}"; do
    for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.05; done
done

fail=0
run() {  # expected-rc args...
    local want=$1; shift
    local out rc=0
    out=$("$BIN" "$@" 2>&1) || rc=$?
    printf '%-3s %s -> rc=%d %s\n' "$([ $rc = "$want" ] && echo ok || echo BAD)" "$*" "$rc" \
        "$(echo "$out" | tail -1)"
    [ "$rc" = "$want" ] || fail=1
}
# SOCKET RW QUEUES IODEPTH RUNTIME_MS SIZE VERIFY INDIRECT POLL_US
for s in "${socks[@]}"; do
    run 0 "$s" 4 2 32 1000 16777216 1 0 50     # randrw, 2 queues, verify
    run 0 "$s" 2 1 1 500 0 0 0 0               # randread QD1, no polling
    run 0 "$s" 3 1 16 1000 16777216 1 1 50     # randwrite, indirect, verify + read-back
    run 0 "$s" 0 2 8 500 8388608 1 0 0         # sequential read, verify
    run 0 "$s" 1 1 4 300 0 0 1 50              # sequential write, indirect
    run 2 "$s" 2 5 1 100 0 0 0 0               # more queues than the device has
done
run 2 "$WORK/none.sock" 2 1 1 100 0 0 0 0      # nothing listening
run 2 "${socks[0]}" 2 1 0 100 0 0 0 0          # iodepth 0
exit $fail
