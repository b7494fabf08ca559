#!/bin/sh
# /init (PID 1) of the Xen testbed's dom0 initramfs; see tests/xen/testbed.py.
#
# Brings up the Xen control plane (xenstored, xen-init-dom0, xenconsoled),
# mounts the host's / read-only and the harness' control directory writable
# over virtio-9p, and runs tests/xen/dom0_agent.py with the host's own Python
# inside a chroot of the host's /.  Mount layout:
#
#   /                   initramfs (busybox, Xen tools and libraries)
#   /run                tmpfs, shared by every view below
#   /run/xenctl         9p "xenctl": the harness' control dir (rw)
#   /run/dom0root       rbind of the initramfs root (for the Xen tools)
#   /run/xen-bin        wrappers: run a Xen tool in /run/dom0root from anywhere
#   /host               9p "hostroot": the host's / (ro), the agent's chroot;
#                       /dev /proc /sys /run bound in, /tmp = dom0's /tmp tmpfs
#
# When the agent exits, dom0 powers off (QEMU then exits).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
export HOME=/root
umask 022
XENBIN=/usr/lib/xen-4.17/bin
CTL=/run/xenctl

say() { echo "dom0-init: $*" >/dev/console; }
die() {
    say "FATAL: $*"
    [ -d "$CTL" ] && echo "$*" >"$CTL/dom0-init.failed"
    sync
    poweroff -f
    sleep 60
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /run/xen /run/xenstored /run/lock /var/lib/xen /var/lib/xenstored \
    /var/log/xen /var/lib/xen/dump $CTL /host
hostname xen-dom0 2>/dev/null
# loopback up: services in dom0 (blkserve serve) listen on 127.0.0.1
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null
say "up, loading modules"

while read -r mod; do
    [ -n "$mod" ] || continue
    insmod "/lib/modules/$mod" || say "insmod $mod failed"
done </etc/dom0-modules

mount -t xenfs xenfs /proc/xen || die "cannot mount xenfs"
grep -q control_d /proc/xen/capabilities 2>/dev/null || die "not running as Xen dom0"

# The control share first: xenconsoled logs guest consoles into it.
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none xenctl $CTL ||
    die "cannot mount the xenctl 9p share"
mkdir -p $CTL/console
rm -f $CTL/dom0-init.failed

$XENBIN/xenstored --pid-file /run/xenstored.pid || die "xenstored failed"
i=0
while [ ! -S /run/xenstored/socket ]; do
    i=$((i + 1))
    [ $i -gt 300 ] && die "xenstored socket did not appear"
    sleep 0.1
done
$XENBIN/xen-init-dom0 >/dev/console 2>&1 || die "xen-init-dom0 failed"
$XENBIN/xenconsoled --pid-file=/run/xenconsoled.pid --log=guest \
    --log-dir=$CTL/console || die "xenconsoled failed"
say "xenstored, xen-init-dom0, xenconsoled running"

# Host settings written by the harness: REPO, AGENT, PYTHON.
[ -r $CTL/boot.env ] || die "no $CTL/boot.env"
. $CTL/boot.env

mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro hostroot /host ||
    die "cannot mount the hostroot 9p share"
# dom0's /tmp goes over the host's: keep the repository (and the Python it
# runs) reachable when the host has them under /tmp (a CI clone)
case "$REPO" in
/tmp/*)
    mkdir -p /run/repo-keep
    mount --bind "/host$REPO" /run/repo-keep || die "cannot bind $REPO aside"
    ;;
esac
mount --bind /tmp /host/tmp || die "cannot bind /tmp into /host"
if [ -d /run/repo-keep/tests ]; then
    mkdir -p "/tmp${REPO#/tmp}"
    mount --bind /run/repo-keep "/host$REPO" || die "cannot bind $REPO back under /tmp"
fi

# Xen tools for the chroot: each wrapper runs the tool in the initramfs root
# (its libraries, /var/lib/xen, /etc/xen), in the caller's directory seen
# through /host.
mkdir -p /run/dom0root /run/xen-bin
mount --rbind / /run/dom0root || die "cannot rbind / to /run/dom0root"
for tool in $XENBIN/* /usr/bin/xenstore /usr/bin/xenstore-*; do
    [ -x "$tool" ] || continue
    name=${tool##*/}
    cat >/run/xen-bin/$name <<EOF
#!/bin/sh
exec chroot /run/dom0root /bin/sh -c 'cd "/host\$0" 2>/dev/null || cd /; exec "\$@"' "\$PWD" $tool "\$@"
EOF
    chmod 755 /run/xen-bin/$name
done

for d in dev proc sys run; do
    mount --rbind /$d /host/$d || die "cannot bind /$d into /host"
done

say "starting agent: $PYTHON $AGENT (repo $REPO)"
chroot /host /usr/bin/env -i \
    PATH=/run/xen-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp TMPDIR=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    "$PYTHON" "$AGENT" --ctl $CTL --repo "$REPO" >$CTL/agent.log 2>&1 </dev/null
rc=$?
echo "$rc" >$CTL/agent.exit
say "agent exited with $rc; powering off"
sync
poweroff -f
sleep 60
