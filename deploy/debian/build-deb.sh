#!/usr/bin/env bash
# Build blkserve_<version>_amd64.deb from this tree (make deb).
#   build-deb.sh OUTDIR [VERSION]
# Layout: /opt/blkserve/.venv (a private virtualenv with blkserve, its
# compiled engine and its Python dependencies from PyPI), /opt/blkserve/deploy
# (the QEMU backend program), /opt/blkserve/docs, the systemd units in
# /lib/systemd/system, the QEMU descriptor in /usr/share/qemu/vhost-user,
# the sample config /etc/blkserve/blkserve.toml (a conffile) and
# /usr/bin/blkserve.  The same paths as the source install of
# docs/OPERATIONS.md, so the units serve both.  Debian's own libraries
# (liburing, librbd, libvirt) are Depends, computed by dpkg-shlibdeps.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd)
# Debian's own interpreter: the venv links to it, and the package Depends on it
py=${PYTHON:-/usr/bin/python3}
version=${2:-$("$py" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$root/pyproject.toml")}
arch=$(dpkg --print-architecture)
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pynext=$("$py" -c 'import sys; print("%d.%d" % (sys.version_info[0], sys.version_info[1] + 1))')

work=$(mktemp -d "$out/.deb-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=/opt/blkserve/.venv

# the virtualenv, built in the staging tree and then moved to its real path
# by rewriting the paths pip wrote into scripts and metadata
"$py" -m venv "$stage$venv"
"$stage$venv/bin/pip" install -q --disable-pip-version-check --no-compile --upgrade pip
"$stage$venv/bin/pip" install -q --disable-pip-version-check --no-compile "$root[libvirt]"
rm -rf "$stage$venv/bin/"[Aa]ctivate* "$stage$venv/share"
find "$stage$venv" -name __pycache__ -type d -prune -exec rm -rf {} +
grep -rlI --null -F "$stage" "$stage$venv" | xargs -0 -r sed -i "s|$stage||g"
if grep -rqI -F "$stage" "$stage$venv"; then
    echo "build-deb: staging path left in the virtualenv" >&2; exit 1
fi
(cd / && "$stage$venv/bin/python" -c "import blkserve._native, blkserve.api.app")  # it runs (not from this tree)

install -d "$stage/opt/blkserve/deploy" "$stage/opt/blkserve/docs" "$stage/usr/bin" \
    "$stage/lib/systemd/system" "$stage/usr/share/qemu/vhost-user" \
    "$stage/etc/blkserve/exports" "$stage/usr/share/doc/blkserve" \
    "$stage/usr/share/blkserve" "$stage/var/lib/blkserve"
chmod 0751 "$stage/var/lib/blkserve"
install -m 0755 "$root/deploy/blkserve-vhost-user-blk" "$stage/opt/blkserve/deploy/"
install -m 0644 "$root/deploy/blkserve.service" "$root/deploy/blkserve-export@.service" \
    "$stage/lib/systemd/system/"
install -m 0644 "$root/deploy/50-blkserve-vhost-user-blk.json" "$stage/usr/share/qemu/vhost-user/"
install -m 0644 "$root/deploy/blkserve.toml" "$stage/etc/blkserve/"
install -m 0644 "$root/docs/"*.md "$stage/opt/blkserve/docs/"
install -m 0644 "$root/README.md" "$stage/opt/blkserve/"
cp -r "$root/deploy/prometheus" "$root/deploy/grafana-dashboard.json" "$stage/usr/share/blkserve/"
ln -s "$venv/bin/blkserve" "$stage/usr/bin/blkserve"
printf 'blkserve is licensed under the Apache License 2.0: /usr/share/common-licenses/Apache-2.0\n' \
    > "$stage/usr/share/doc/blkserve/copyright"

# Depends: the Debian packages of the shared libraries every ELF file links
# (manylinux wheels bring their own copies of what they need: those are
# found next to them, or skipped)
mkdir -p "$work/debian"
printf 'Source: blkserve\n\nPackage: blkserve\nArchitecture: any\n' > "$work/debian/control"
mapfile -t elfs < <(find "$stage$venv" -name '*.so*' -type f)
libdirs=$(find "$stage$venv" -type d -name '*.libs' -printf '-l%p ')
# shellcheck disable=SC2086
shlibs=$(cd "$work" && dpkg-shlibdeps -O --ignore-missing-info $libdirs \
    "${elfs[@]}" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')

install -d "$stage/DEBIAN"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"
printf '/etc/blkserve/blkserve.toml\n' > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: blkserve
Version: $version
Architecture: $arch
Maintainer: blkserve developers <blkserve@localhost>
Installed-Size: $size
Depends: python3 (>= $pyver), python3 (<< $pynext), init-system-helpers, $shlibs
Recommends: qemu-system-x86, qemu-utils, python3-bpfcc, linux-headers-amd64
Suggests: ceph-common, prometheus, libvirt-daemon-system
Section: admin
Priority: optional
Homepage: https://localhost/blkserve
Description: userspace vhost-user-blk storage backend for virtual machines
 blkserve serves files, block devices and Ceph RBD images to QEMU, libvirt
 and Xen guests through a C io_uring data path, with a REST control plane
 (blkserve.service), standalone exports (blkserve-export@.service), eBPF
 tracing and Prometheus metrics.  Export workers keep serving guests while
 the control plane restarts or the package is upgraded.
CONTROL
deb="$out/blkserve_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz -z3 --build "$stage" "$deb" >/dev/null
echo "$deb"
