#!/bin/sh
# /init (PID 1) of the Xen testbed's PV domU initramfs; see tests/xen/testbed.py.
#
# Command channel: the domain's own xenstore directory data/ (relative paths
# resolve to /local/domain/<domid>/data; dom0 gives the domU ownership of it).
#   dom0 writes data/cmd = "SEQ TIMEOUT N B64": the script, base64-encoded,
#           inline (N = 0) or in data/cmd-chunk/0..N-1 (B64 empty)
#   domU runs the script with /bin/sh in its own session (stdin /dev/null,
#           stdout+stderr to a file), kills the session after TIMEOUT seconds,
#           then writes (one transaction) data/out/0..M-1 = base64 chunks of
#           the output's tail and data/res = "SEQ RC TIMEDOUT(0/1) SIZE M"
# xenstored limits values written by a domU to 2048 bytes, hence the chunks.
# Process creation is slow in a PV guest under TCG: keep forks per command few.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

say() { echo "domu-init: $*" >/dev/console; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname xen-domu 2>/dev/null

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || say "insmod $mod failed"
done </etc/domu-modules
mkdir -p /proc/xen
mount -t xenfs xenfs /proc/xen 2>/dev/null

OUT_MAX=49152   # bytes of output (the tail) sent back per command
CHUNK=2000      # base64 characters per xenstore value

run_cmd() {  # SEQ TIMEOUT N [B64]
    seq=$1 t=$2 n=$3
    if [ "$n" -gt 0 ]; then
        paths=""
        i=0
        while [ "$i" -lt "$n" ]; do
            paths="$paths data/cmd-chunk/$i"
            i=$((i + 1))
        done
        # shellcheck disable=SC2086
        xenstore-read $paths | base64 -d >/tmp/.xcmd
    else
        echo "$4" | base64 -d >/tmp/.xcmd
    fi
    rm -f /tmp/.xto
    setsid sh /tmp/.xcmd </dev/null >/tmp/.xout 2>&1 &
    pid=$!
    (sleep "$t"; : >/tmp/.xto; kill -9 -- "-$pid") </dev/null >/dev/null 2>&1 &
    wd=$!
    wait "$pid"
    rc=$?
    kill "$wd" 2>/dev/null
    to=0
    [ -e /tmp/.xto ] && to=1
    set -- $(wc -c </tmp/.xout; tail -c "$OUT_MAX" /tmp/.xout | base64 -w "$CHUNK")
    size=$1
    shift
    i=0
    for chunk; do
        set -- "$@" "data/out/$i" "$chunk"
        shift
        i=$((i + 1))
    done
    xenstore-write "$@" data/res "$seq $rc $to $size $i" ||
        say "cannot write the result of command $seq"
}

serve() {
    # One long-lived watch on data/cmd feeds events through a FIFO: no fork
    # per wait, and no event is lost while a command runs.
    rm -f /tmp/.xw
    mkfifo /tmp/.xw
    xenstore-watch data/cmd >/tmp/.xw 2>/dev/null &
    watcher=$!
    exec 3</tmp/.xw
    until xenstore-write data/ready "$(uname -r)" 2>/dev/null; do
        sleep 0.2
    done
    while read -r _event <&3; do
        set -- $(xenstore-read data/cmd 2>/dev/null)
        [ $# -ge 3 ] && [ "$1" != "$last" ] || continue
        last=$1
        run_cmd "$@"
    done
    exec 3<&-
    kill "$watcher" 2>/dev/null
}

say "serving commands from xenstore data/"
last=""
while :; do
    serve
    say "xenstore watch ended; restarting it"
    sleep 1
done
