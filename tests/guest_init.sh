#!/bin/sh
# /init of the blkserve test guest (PID 1 inside the initramfs).
#
# Console (kernel messages) is ttyS0; the harness drives a shell on ttyS1 so
# that kernel messages never interleave with command output.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022

mkdir -p /proc /sys /dev /tmp /run /mnt /root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

# Load modules in dependency order (computed on the host at build time).
if [ -f /etc/guest-modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        insmod "/lib/modules/$mod" || echo "init: insmod $mod failed" >/dev/console
    done </etc/guest-modules
fi

hostname blkserve-guest 2>/dev/null
echo "init: modules loaded, starting control shell on ttyS1" >/dev/console

# Respawn the control shell forever: PID 1 must never exit.
while :; do
    setsid sh -c '
        exec </dev/ttyS1 >/dev/ttyS1 2>&1
        stty -echo icanon -ixon -ixoff -opost isig
        export PS1="" PS2=""
        echo "BLKSERVE_GUEST""_READY"
        exec sh -i
    '
    sleep 1
done
