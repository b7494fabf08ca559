"""A real Xen host for tests: Xen 4.17 with a PV dom0 and PV domUs, emulated
under ``qemu-system-x86_64 -accel tcg`` (no KVM, no Xen on the host needed).

The project's own code runs in dom0 unchanged: dom0 mounts the host's ``/``
read-only over virtio-9p and runs tests/xen/dom0_agent.py with the host's
Python in a chroot of it (repository at the same path, its ``.venv`` works),
against dom0's real ``/dev/xen/*``.  PV domUs boot the same Debian kernel with
a small initramfs (busybox, ``xen-blkfront``, fio, util-linux tools) and take
shell commands over xenstore.  Facts this relies on: /work/shared/XEN-TESTBED.md.

Public API:

* ``build_xen_images(cache_dir=None) -> XenImages`` -- Xen ELF, dom0/domU
  kernel, dom0 and domU initramfs, from Debian packages (``apt-get download``
  + ``dpkg-deb -x``), cached outside the repository (same cache directory as
  tests/guest.py, subdirectory ``xen-4.17/``), keyed on the package versions
  and a hash of the recipe.
* ``XenHost(workdir)`` -- context manager: boots the host, waits for the dom0
  agent; ``dom0()`` / ``dom0_check()`` / ``dom0_spawn()`` run commands in dom0,
  ``create_domu()`` / ``domu()`` / ``domu_check()`` / ``domu_console()`` /
  ``destroy_domu()`` drive PV domUs; powers the host off on exit.
* ``XenUnavailable`` -- this machine cannot run the testbed (message names the
  missing capability); tests skip on it.  ``XenError`` / ``XenTimeout`` /
  ``XenCommandError`` report failures.

Example::

    with XenHost(tmp_path) as host:
        host.dom0_check(".venv/bin/python -c 'import blkserve'")
        pid = host.dom0_spawn(".venv/bin/python -m my_backend", "/tmp/backend.log")
        host.create_domu("domu1")
        rc, out = host.domu("cat /sys/block/xvdb/size")

Inside dom0, commands run in a chroot of the host's ``/`` (read-only; cwd =
the repository) with dom0's own ``/dev /proc /sys /run`` and a tmpfs on
``/tmp`` (the writable scratch place, ~450 MB); ``xl`` and ``xenstore-*`` are
on PATH (wrappers that run the tools of the initramfs, which also see that
``/tmp``).  The host's libxenstore (if installed) reaches dom0's xenstored via
``/run/xenstored/socket``.  Inside a domU, commands run with busybox sh;
call fio and util-linux tools by absolute path (``/usr/bin/fio``,
``/sbin/blockdev``, ``/sbin/blkdiscard``, ``/bin/sync``); ``/tmp`` is a tmpfs.

Costs under TCG (2 cores, one busy elsewhere): boot to agent ready ~25 s,
``create_domu`` ~15 s, a dom0 command 0.2-0.7 s (each process creation in a
PV guest costs ~0.1 s; the venv's Python ~2 s), a domU command ~0.7 s.
Standard library only.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS_DIR = HERE.parent
REPO = TESTS_DIR.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
import guest as _g  # noqa: E402  (tests/guest.py: cache dir, apt, ELF, cpio helpers)

DOM0_INIT = HERE / "dom0_init.sh"
DOMU_INIT = HERE / "domu_init.sh"
AGENT = HERE / "dom0_agent.py"

# Bump when the image recipe changes in a way the hashed inputs below miss.
RECIPE_VERSION = 4
CACHE_SUBDIR = "xen-4.17"

XEN_PACKAGES = (
    "xen-hypervisor-4.17-amd64",
    "xen-hypervisor-common",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenstore4",
    "libxengnttab1",
    "libxenevtchn1",
    "libxencall1",
    "libxenforeignmemory1",
    "libxenmisc4.17",
    "libxentoollog1",
    "libxentoolcore1",
    "libxendevicemodel1",
    "libxenhypfs1",
    "libyajl2",
)
BUSYBOX_PACKAGE = "busybox-static"
KERNEL_PKG_RE = r"^linux-image-6\.1\.0-[0-9]+-amd64$"

# Kernel modules (dependencies are added from modinfo); all others needed are
# built into Debian's 6.1 kernel (Xen PV, xenbus, hvc console, balloon).
DOM0_MODULES = (
    "xen_evtchn",
    "xen_gntdev",
    "xen_gntalloc",
    "xen_privcmd",
    "xenfs",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
)
DOMU_MODULES = ("xenfs", "xen_blkfront")
REQUIRED_BUILTIN_CONFIG = (
    "CONFIG_XEN_PV",
    "CONFIG_XEN_XENBUS_FRONTEND",
    "CONFIG_XEN_SYS_HYPERVISOR",
    "CONFIG_HVC_XEN",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
)
# Host binaries copied into the domU with their libraries.  Call them by
# absolute path in domU commands: busybox sh prefers its own applets.
DOMU_TOOLS = (
    "/usr/bin/fio",
    "/sbin/blockdev",
    "/sbin/blkdiscard",
    "/bin/sync",
    "/usr/bin/sha256sum",
)
TOOL_PACKAGES = {
    "/usr/bin/fio": "fio",
    "/sbin/blockdev": "util-linux",
    "/sbin/blkdiscard": "util-linux",
    "/bin/sync": "coreutils",
    "/usr/bin/sha256sum": "coreutils",
}
# Xen package content left out of the dom0 initramfs (docs, boot files,
# SysV init scripts, pygrub's Python modules, HVM firmware).
DOM0_SKIP_PREFIXES = (
    "usr/share/",
    "boot/",
    "etc/init.d/",
    "etc/default/",
    "usr/lib/xen-4.17/lib/python/",
    "usr/lib/xen-4.17/boot/",
    "lib/systemd/",
    "usr/lib/systemd/",
)
# dom0 binaries whose libraries must all resolve.
DOM0_ESSENTIAL = ("xl", "xenstored", "xenconsoled", "xen-init-dom0", "xenstore")

XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 console_timestamps=boot "
    "dom0_mem={mem}M,max:{mem}M dom0_max_vcpus=1"
)
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen rdinit=/init"
DOMU_CMDLINE = "console=hvc0 rdinit=/init rootfstype=ramfs"


class XenUnavailable(_g.GuestUnavailable):
    """This machine lacks a capability the Xen testbed needs (tests skip)."""


class XenError(RuntimeError):
    """The Xen testbed (QEMU, Xen, dom0, its agent or a domU) failed."""


class XenTimeout(XenError):
    pass


class XenCommandError(XenError):
    def __init__(self, where: str, cmd: str, code: int, output: str):
        self.where, self.cmd, self.code, self.output = where, cmd, code, output
        super().__init__(f"{where} command failed (exit {code}): {cmd}\n--- output ---\n{output}")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return _g._run(argv, **kw)


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class XenImages:
    xen: Path  # the hypervisor, a 32-bit multiboot ELF (QEMU -kernel)
    kernel: Path  # Linux (bzImage) for dom0 and domUs
    vmlinux: Path  # the same kernel as plain ELF: no xz decompression when loading it
    dom0_initrd: Path
    domu_initrd: Path
    directory: Path
    kernel_release: str
    versions: dict  # package -> version


def _recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(f"{RECIPE_VERSION}".encode())
    for f in (DOM0_INIT, DOMU_INIT):
        h.update(f.read_bytes())
    for item in (
        XEN_PACKAGES
        + DOM0_MODULES
        + DOMU_MODULES
        + DOMU_TOOLS
        + DOM0_SKIP_PREFIXES
        + REQUIRED_BUILTIN_CONFIG
    ):
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:12]


def _candidate_versions() -> dict[str, str]:
    """{package: candidate version} for everything the images are made of."""
    if not shutil.which("apt-cache"):
        raise XenUnavailable("apt-cache not installed (needed to fetch the Xen packages)")
    kernels = _g.apt_candidates(KERNEL_PKG_RE)
    if not kernels:
        raise XenUnavailable(
            "no linux-image-6.1.0-*-amd64 package known to apt (Debian 12 sources needed)"
        )
    kernel = max(kernels, key=lambda n: int(re.match(r"linux-image-6\.1\.0-(\d+)-", n).group(1)))
    pkgs = (*XEN_PACKAGES, BUSYBOX_PACKAGE)
    res = _run(["apt-cache", "policy", *pkgs])
    versions, current = {}, None
    for line in res.stdout.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            cand = line.split(":", 1)[1].strip()
            if cand and cand != "(none)":
                versions[current] = cand
    missing = [p for p in pkgs if p not in versions]
    if missing:
        raise XenUnavailable(f"apt knows no candidate for {missing} (Debian 12 sources needed)")
    versions[kernel] = kernels[kernel]
    return versions


def _image_dirname(versions: dict[str, str]) -> str:
    key = "\n".join(f"{p}={v}" for p, v in sorted(versions.items()))
    h = hashlib.sha256(key.encode()).hexdigest()[:10]
    kernel = next(p for p in versions if p.startswith("linux-image-"))
    xen = versions["xen-hypervisor-4.17-amd64"].split("-", 1)[0]
    name = f"xen-{xen}_{kernel[len('linux-image-') :]}_{h}_{_recipe_hash()}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _cached_images(cache: Path) -> list[Path]:
    suffix = "_" + _recipe_hash()
    found = [
        d for d in cache.glob("xen-*") if d.name.endswith(suffix) and (d / "manifest.json").exists()
    ]
    return sorted(found, key=lambda d: d.stat().st_mtime)


def _images_from_dir(d: Path) -> XenImages:
    m = json.loads((d / "manifest.json").read_text())
    try:
        os.utime(d)  # "last used", for _prune_stale()
    except OSError:
        pass
    return XenImages(
        xen=d / "xen.elf",
        kernel=d / "vmlinuz",
        dom0_initrd=d / "dom0-initrd.gz",
        vmlinux=d / "vmlinux",
        domu_initrd=d / "domu-initrd.cpio",
        directory=d,
        kernel_release=m["kernel_release"],
        versions=m["versions"],
    )


def _prune_stale(cache: Path, keep: Path, days: float = 14) -> None:
    """Remove images (other recipes or package versions) unused for DAYS."""
    limit = time.time() - days * 86400
    for d in cache.glob("xen-*"):
        try:
            if d != keep and d.is_dir() and d.stat().st_mtime < limit:
                shutil.rmtree(d)
        except OSError:
            pass


def _download(versions: dict[str, str], dest: Path) -> list[Path]:
    specs = [f"{p}={v}" for p, v in sorted(versions.items())]
    res = _run(["apt-get", "download", *specs], cwd=dest)
    if res.returncode != 0 and os.geteuid() == 0:
        _run(["apt-get", "update"])
        res = _run(["apt-get", "download", *specs], cwd=dest)
    if res.returncode != 0:
        raise XenUnavailable(
            f"apt-get download of the Xen/kernel packages failed:\n{res.stdout}{res.stderr}"
        )
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != len(specs):
        raise XenError(f"apt-get download gave {[d.name for d in debs]} for {specs}")
    return debs


def _deb_package(deb: Path) -> str:
    return deb.name.split("_", 1)[0]


def _ensure_host_tools() -> None:
    missing = [t for t in DOMU_TOOLS if not os.path.exists(t)]
    if not missing:
        return
    pkgs = sorted({TOOL_PACKAGES[t] for t in missing})
    if os.geteuid() == 0:
        _run(
            ["apt-get", "install", "-y", "--no-install-recommends", *pkgs],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    still = [t for t in DOMU_TOOLS if not os.path.exists(t)]
    if still:
        raise XenUnavailable(f"host tools for the domU image missing: {still} (install {pkgs})")


def _ldd(binary: Path, libpath: list[Path]) -> tuple[list[str], list[str]]:
    """(resolved library paths, unresolved names) of an ELF file."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(str(p) for p in libpath)}
    res = _run(["ldd", str(binary)], env=env)
    found, missing = [], []
    if res.returncode != 0:
        if "not a dynamic executable" in res.stdout + res.stderr:
            return found, missing
        raise XenError(f"ldd {binary} failed: {res.stdout}{res.stderr}")
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, target = (s.strip() for s in line.split("=>", 1))
            target = target.split(" (", 1)[0].strip()
            if target == "not found":
                missing.append(name)
            elif target.startswith("/"):
                found.append(target)
        elif line.startswith("/"):
            found.append(line.split(" (", 1)[0].strip())
    return found, missing


def _extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage (x86 boot protocol >= 2.08).

    Xen and libxenguest can load it directly; given the bzImage they would
    first xz-decompress it, which takes 10-20 s under TCG."""
    if bzimage[0x202:0x206] != b"HdrS":
        raise XenError("kernel image is not a bzImage")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise XenError(f"unsupported bzImage payload compression {payload[:6]!r}")
    if elf[:4] != b"\x7fELF":
        raise XenError("the bzImage payload is not an ELF file")
    return elf


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _resolve_modules(moddir: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """[(module name, .ko bytes)] for WANTED plus dependencies, in load order."""
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        builtin = {
            _g._modname(Path(line.strip()).name)
            for line in bfile.read_text().splitlines()
            if line.strip()
        }
    index = {_g._modname(p.name): p for p in (moddir / "kernel").rglob("*.ko*")}
    cache: dict[str, tuple[bytes, list[str]]] = {}

    def load(name: str) -> tuple[bytes, list[str]]:
        if name not in cache:
            data = _g._read_module(index[name])
            deps = [d for dep in _g._modinfo(data).get("depends", []) for d in dep.split(",") if d]
            cache[name] = (data, [_g._modname(d) for d in deps])
        return cache[name]

    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...] = ()) -> None:
        if name in order or name in builtin:
            return
        if name not in index:
            raise XenError(f"kernel module {name} is neither built in nor in {moddir}")
        if name in stack:
            raise XenError(f"module dependency cycle at {name}")
        for dep in load(name)[1]:
            visit(dep, (*stack, name))
        order.append(name)

    for name in wanted:
        visit(name)
    return [(n, load(n)[0]) for n in order]


def _add_libs(
    img: _g.Initramfs, binaries: list[Path], libpath: list[Path], pkgroot: Path | None
) -> list:
    """Add the libraries of BINARIES (those inside PKGROOT are assumed added)."""
    missing = []
    for b in binaries:
        found, unresolved = _ldd(b, libpath)
        missing += [(b, m) for m in unresolved]
        for lib in found:
            if pkgroot is not None and lib.startswith(str(pkgroot) + "/"):
                continue
            if lib not in img.libs:
                img.libs.add(lib)
                img.host_file(lib)
    return missing


def _build_into(tmp: Path, versions: dict[str, str]) -> dict:
    work = tmp / "work"
    (work / "debs").mkdir(parents=True)
    try:
        debs = _download(versions, work / "debs")
        xenroot, kroot, bbroot = work / "xen", work / "kernel", work / "busybox"
        for deb in debs:
            pkg = _deb_package(deb)
            dest = (
                kroot
                if pkg.startswith("linux-image-")
                else bbroot
                if pkg == BUSYBOX_PACKAGE
                else xenroot
            )
            _run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)

        # Xen: the gzip'ed multiboot ELF -> plain ELF for QEMU's -kernel.
        xen_gz = sorted((xenroot / "boot").glob("xen-4.17*-amd64.gz"))
        if not xen_gz:
            raise XenError("no boot/xen-4.17*-amd64.gz in xen-hypervisor-4.17-amd64")
        (tmp / "xen.elf").write_bytes(gzip.decompress(xen_gz[0].read_bytes()))

        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise XenError("no boot/vmlinuz-* in the kernel package")
        krel = vmlinuz[0].name[len("vmlinuz-") :]
        config = (kroot / "boot" / f"config-{krel}").read_text()
        lacking = [o for o in REQUIRED_BUILTIN_CONFIG if not re.search(rf"^{o}=y$", config, re.M)]
        if lacking:
            raise XenError(f"kernel {krel} lacks built-in {lacking}")
        shutil.copyfile(vmlinuz[0], tmp / "vmlinuz")
        (tmp / "vmlinux").write_bytes(_extract_vmlinux(vmlinuz[0].read_bytes()))
        moddir = next(
            p
            for p in (kroot / "lib/modules" / krel, kroot / "usr/lib/modules" / krel)
            if p.is_dir()
        )
        busybox = next(
            p for p in (bbroot / "bin/busybox", bbroot / "usr/bin/busybox") if p.exists()
        )
        if _g._elf_interp(busybox) is not None:
            raise XenError(f"{busybox} from {BUSYBOX_PACKAGE} is not static")
        xen_libpath = [
            xenroot / "usr/lib/x86_64-linux-gnu",
            xenroot / "usr/lib/xen-4.17/lib/x86_64-linux-gnu",
        ]

        # dom0: Xen tools + their libraries, busybox, modules.
        dom0_modules = _resolve_modules(moddir, DOM0_MODULES)
        img = _g.Initramfs(tmp / "dom0-initrd.gz")
        added = img.tree(xenroot, DOM0_SKIP_PREFIXES)
        img.busybox(busybox)
        elves = [
            xenroot / gp
            for gp in added
            if (xenroot / gp).is_file()
            and not (xenroot / gp).is_symlink()
            and os.access(xenroot / gp, os.X_OK)
            and _is_elf(xenroot / gp)
            and ("/bin/" in "/" + gp or "/sbin/" in "/" + gp)
        ]
        missing = _add_libs(img, elves, xen_libpath, xenroot)
        essential = [(b, m) for b, m in missing if b.name in DOM0_ESSENTIAL]
        if essential:
            raise XenError(f"unresolved libraries for dom0 tools: {essential}")
        gcc_s = next(
            (
                p
                for p in (
                    "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                    "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1",
                )
                if os.path.exists(p)
            ),
            None,
        )
        if gcc_s is None:  # xl aborts without it (pthread_cancel)
            raise XenUnavailable("libgcc_s.so.1 not found on the host (package libgcc-s1)")
        img.host_file(gcc_s)
        img.modules(dom0_modules, "etc/dom0-modules")
        img.close(DOM0_INIT)
        dom0_libs = sorted(img.libs)

        # domU: busybox, xenstore client, blkfront, fio and util-linux tools.
        _ensure_host_tools()
        domu_modules = _resolve_modules(moddir, DOMU_MODULES)
        # Uncompressed: libxenguest would gunzip it in dom0, ~6 s under TCG.
        img = _g.Initramfs(tmp / "domu-initrd.cpio", compress=False)
        xs = xenroot / "usr/bin/xenstore"
        img.c.file("usr/bin/xenstore", xs.read_bytes(), mode=0o755)
        for sub in ("read", "write", "rm", "ls", "list", "exists", "chmod", "watch"):
            img.c.symlink(f"usr/bin/xenstore-{sub}", "xenstore")
        for lib in ("libxenstore.so.4", "libxentoolcore.so.1"):
            real = (xenroot / "usr/lib/x86_64-linux-gnu" / lib).resolve()
            img.c.file(f"usr/lib/x86_64-linux-gnu/{lib}", real.read_bytes(), mode=0o755)
        if _add_libs(img, [xs], xen_libpath, xenroot):
            raise XenError("unresolved libraries for the domU xenstore client")
        for tool in DOMU_TOOLS:
            img.host_file(tool)
        missing = _add_libs(img, [Path(t) for t in DOMU_TOOLS], [], None)
        if missing:
            raise XenError(f"unresolved libraries for domU tools: {missing}")
        img.busybox(busybox)  # after the tools: their paths must not become applets
        img.modules(domu_modules, "etc/domu-modules")
        img.close(DOMU_INIT)
        domu_libs = sorted(img.libs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = {
        "versions": versions,
        "kernel_release": krel,
        "recipe": _recipe_hash(),
        "dom0_modules": [n for n, _ in dom0_modules],
        "domu_modules": [n for n, _ in domu_modules],
        "dom0_host_libraries": dom0_libs,
        "domu_host_libraries": domu_libs,
        "domu_tools": list(DOMU_TOOLS),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def default_cache_dir() -> Path:
    """tests/guest.py's cache directory, subdirectory xen-4.17/."""
    return _g.default_cache_dir() / CACHE_SUBDIR


def build_xen_images(cache_dir: str | os.PathLike | None = None) -> XenImages:
    """Build (or reuse) the Xen testbed images.

    Safe against concurrent callers (flock; build in a temporary directory,
    renamed into place).  When apt cannot tell the package versions (offline),
    the newest image built with the current recipe is used.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise XenUnavailable(f"cannot create the image cache {cache}: {e}") from None
    try:
        versions = _candidate_versions()
    except XenUnavailable:
        if cached := _cached_images(cache):
            return _images_from_dir(cached[-1])
        raise
    final = cache / _image_dirname(versions)
    if (final / "manifest.json").exists():
        return _images_from_dir(final)
    for tool in ("apt-get", "dpkg-deb", "ldd"):
        if not shutil.which(tool):
            raise XenUnavailable(f"{tool} not installed (needed to build the Xen testbed images)")
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").exists():  # built by someone else meanwhile
            return _images_from_dir(final)
        for stale in cache.glob(".build-*"):  # leftovers of killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build_into(tmp, versions)
            os.chmod(tmp, 0o755)
            os.replace(tmp, final)
            _prune_stale(cache, final)
        except XenUnavailable:
            shutil.rmtree(tmp, ignore_errors=True)
            if cached := _cached_images(cache):
                return _images_from_dir(cached[-1])
            raise
        except XenError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if cached := _cached_images(cache):
                warnings.warn(f"Xen image build failed, using {cached[-1].name}: {e}", stacklevel=2)
                return _images_from_dir(cached[-1])
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _images_from_dir(final)


# --------------------------------------------------------------------------
# The host
# --------------------------------------------------------------------------

_LIVE: set[subprocess.Popen] = set()


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_LIVE):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _die_with_parent() -> None:
    """preexec_fn: QEMU gets SIGKILL if the test process dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _plain_path(path: Path, linkdir: Path) -> Path:
    """PATH, or a symlink to it in LINKDIR when PATH has characters that
    QEMU's multiboot module list cannot carry (commas, spaces)."""
    if not re.search(r"[,\s]", str(path)):
        return path
    link = linkdir / path.name
    if not link.exists():
        link.symlink_to(path)
    if re.search(r"[,\s]", str(link)):
        raise XenError(f"cannot find a comma/space-free path for {path}")
    return link


class XenHost:
    """A Xen host under QEMU TCG; use as a context manager.

    ``workdir`` (created if needed) receives ``serial.log`` (Xen + dom0
    console), ``qemu.log``, ``qemu.cmdline`` and ``ctl/`` (the 9p control
    share: requests, responses, ``agent.log``, ``console/guest-<name>.log``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        dom0_mem_mb: int = 1024,
        qemu_mem_mb: int = 2048,
        images: XenImages | None = None,
        boot_timeout: float = 300.0,
    ):
        self.qemu = shutil.which("qemu-system-x86_64")
        if not self.qemu:
            raise XenUnavailable("qemu-system-x86_64 not installed (package qemu-system-x86)")
        self.workdir = Path(workdir).resolve()
        self.dom0_mem_mb, self.qemu_mem_mb = dom0_mem_mb, qemu_mem_mb
        self.images = images
        self.boot_timeout = boot_timeout
        self.serial_log = self.workdir / "serial.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.ctl = self.workdir / "ctl"
        self.proc: subprocess.Popen | None = None
        self.boot_time: float | None = None  # QEMU start -> dom0 agent ready, seconds
        self.agent_info: dict = {}
        self.domids: dict[str, int] = {}
        # name -> seconds spent in `xl create` and from there to the domU's agent
        self.domu_timings: dict[str, dict[str, float]] = {}
        self._qemu_log_f = None

    # -- lifecycle ---------------------------------------------------------

    def argv(self) -> list[str]:
        img = self.images
        links = self.workdir / "img"
        links.mkdir(exist_ok=True)
        xen, kernel, initrd = (
            _plain_path(p, links) for p in (img.xen, img.vmlinux, img.dom0_initrd)
        )
        return [
            self.qemu,
            "-name",
            "blkserve-xen-testbed,process=bs-xen-testbed",
            "-accel",
            "tcg",
            "-cpu",
            "qemu64",
            "-m",
            str(self.qemu_mem_mb),
            "-smp",
            "1",
            "-display",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-chardev",
            f"file,id=com1,path={_g._qopt(self.serial_log)}",
            "-serial",
            "chardev:com1",
            "-kernel",
            str(xen),
            "-append",
            XEN_CMDLINE.format(mem=self.dom0_mem_mb),
            "-initrd",
            f"{kernel} {DOM0_CMDLINE},{initrd}",
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev",
            f"local,id=xenctl,path={_g._qopt(self.ctl)},security_model=none",
            "-device",
            "virtio-9p-pci,fsdev=xenctl,mount_tag=xenctl",
        ]

    def start(self) -> XenHost:
        if self.images is None:
            self.images = build_xen_images()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.ctl.exists():
            shutil.rmtree(self.ctl)
        for d in ("req", "resp", "console"):
            (self.ctl / d).mkdir(parents=True)
        python = sys.executable if os.path.exists(sys.executable) else "/usr/bin/python3"
        (self.ctl / "boot.env").write_text(
            f"REPO={shlex.quote(str(REPO))}\n"
            f"AGENT={shlex.quote(str(AGENT))}\n"
            f"PYTHON={shlex.quote(python)}\n"
        )
        argv = self.argv()
        (self.workdir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        self._qemu_log_f = open(self.qemu_log, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._qemu_log_f,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        _LIVE.add(self.proc)
        try:
            ready = self.ctl / "ready.json"
            deadline = t0 + self.boot_timeout
            while not ready.exists():
                self._check_alive("while booting")
                if time.monotonic() > deadline:
                    raise XenTimeout(
                        f"the dom0 agent was not ready within {self.boot_timeout:.0f}s\n"
                        + self.diagnostics()
                    )
                time.sleep(0.2)
            self.boot_time = time.monotonic() - t0
            self.agent_info = json.loads(ready.read_text())
        except BaseException:
            self.kill()
            raise
        return self

    def __enter__(self) -> XenHost:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self, timeout: float = 60.0) -> int | None:
        """Power dom0 off (QEMU exits); kill QEMU if that does not happen."""
        if self.alive():
            try:
                self._request({"op": "poweroff"}, timeout=30)
            except XenError:
                timeout = 5  # the agent is gone or dom0 is wedged: do not linger
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        return self.proc.returncode if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            _LIVE.discard(self.proc)
        if self._qemu_log_f is not None:
            self._qemu_log_f.close()
            self._qemu_log_f = None

    def _check_alive(self, what: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise XenError(f"QEMU exited (rc {rc}) {what}\n" + self.diagnostics())
        failed = self.ctl / "dom0-init.failed"
        if failed.exists():
            raise XenError(f"dom0 init failed {what}: {failed.read_text()}\n" + self.diagnostics())

    def diagnostics(self, serial_chars: int = 6000) -> str:
        parts = [f"logs in {self.workdir}"]
        if self.proc is not None and self.proc.poll() is not None:
            parts.append(f"QEMU exited with {self.proc.returncode}")
        parts.append("--- qemu.log ---\n" + _g._tail(self.qemu_log, 2000))
        parts.append("--- serial.log (Xen + dom0) ---\n" + _g._tail(self.serial_log, serial_chars))
        agent_log = self.ctl / "agent.log"
        if agent_log.exists():
            parts.append("--- dom0 agent.log ---\n" + _g._tail(agent_log, 3000))
        return "\n".join(parts)

    # -- control channel ---------------------------------------------------

    def _request(self, req: dict, timeout: float) -> dict:
        """Send REQ to the dom0 agent and wait up to TIMEOUT for its answer."""
        rid = uuid.uuid4().hex
        req = {**req, "id": rid}
        tmp = self.ctl / "req" / f".{rid}.tmp"
        tmp.write_text(json.dumps(req))
        os.replace(tmp, self.ctl / "req" / f"{rid}.json")
        resp_path = self.ctl / "resp" / f"{rid}.json"
        deadline = time.monotonic() + timeout
        delay = 0.01
        while not resp_path.exists():
            if req["op"] != "poweroff":
                self._check_alive(f"during {req['op']} request")
            elif not self.alive():
                return {"ok": True}
            if time.monotonic() > deadline:
                raise XenTimeout(
                    f"no answer from the dom0 agent to {req['op']} within {timeout:.0f}s\n"
                    + self.diagnostics()
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)
        resp = json.loads(resp_path.read_text())
        resp_path.unlink()
        if not resp.get("ok"):
            raise XenError(
                f"dom0 agent: {req['op']} failed: {resp.get('error')}\n{resp.get('traceback', '')}"
            )
        return resp

    # -- dom0 --------------------------------------------------------------

    def dom0(self, cmd: str, timeout: float = 120) -> tuple[int, str]:
        """Run a shell command line in dom0 (chroot of the host's /, cwd = the
        repository); returns (exit code, combined stdout+stderr)."""
        resp = self._request({"op": "sh", "cmd": cmd, "timeout": timeout}, timeout + 60)
        if resp["timed_out"]:
            raise XenTimeout(
                f"dom0 command timed out after {timeout}s: {cmd}\n--- output so far ---\n"
                f"{resp['output']}\n" + self.diagnostics(3000)
            )
        return resp["rc"], resp["output"]

    def dom0_check(self, cmd: str, timeout: float = 120) -> str:
        rc, out = self.dom0(cmd, timeout)
        if rc != 0:
            raise XenCommandError("dom0", cmd, rc, out)
        return out

    def dom0_spawn(self, cmd: str, log: str) -> int:
        """Start CMD in the background in dom0 (own session, cwd = the
        repository), output appended to LOG (a dom0 path, e.g. under /tmp);
        returns its pid (in dom0)."""
        return self._request({"op": "spawn", "cmd": cmd, "log": log}, 60)["pid"]

    # -- domUs -------------------------------------------------------------

    def create_domu(
        self,
        name: str = "domu1",
        mem_mb: int = 256,
        *,
        timeout: float = 180,
        extra_config: list[str] = (),
    ) -> int:
        """``xl create`` a PV domU (same kernel, domU initramfs); returns its
        domid once its command loop answers.  EXTRA_CONFIG: more xl.cfg lines."""
        img = self.images
        resp = self._request(
            {
                "op": "create_domu",
                "name": name,
                "mem_mb": mem_mb,
                "kernel": str(img.vmlinux),
                "ramdisk": str(img.domu_initrd),
                "cmdline": DOMU_CMDLINE,
                "extra_config": list(extra_config),
                "timeout": timeout,
            },
            timeout + 60,
        )
        self.domids[name] = resp["domid"]
        self.domu_timings[name] = {
            "xl_create": resp["xl_create_seconds"],
            "boot": resp["boot_seconds"],
        }
        return resp["domid"]

    def adopt_domu(self, name: str = "domu1") -> int:
        """After ``xl restore`` (a new domid, same name): commands go to the
        restored domain; returns its domid."""
        domid = self._request({"op": "adopt_domu", "name": name}, 60)["domid"]
        self.domids[name] = domid
        return domid

    def destroy_domu(self, name: str = "domu1") -> None:
        self._request({"op": "destroy_domu", "name": name}, 120)
        self.domids.pop(name, None)

    def domu_console(self, name: str = "domu1") -> str:
        """The domU's console output so far (logged by xenconsoled)."""
        path = self.ctl / "console" / f"guest-{name}.log"
        try:
            return path.read_bytes().decode(errors="replace")
        except OSError as e:
            return f"<no console log {path}: {e}>"

    def domu(self, cmd: str, timeout: float = 120, name: str = "domu1") -> tuple[int, str]:
        """Run a shell command line in domU NAME (busybox sh; stdin /dev/null);
        returns (exit code, combined output; only its last 48 KiB)."""
        resp = self._request(
            {"op": "domu", "name": name, "cmd": cmd, "timeout": timeout}, timeout + 120
        )
        if resp["timed_out"]:
            what = resp.get("detail") or f"domU {name} command timed out after {timeout}s: {cmd}"
            raise XenTimeout(
                f"{what}\n--- output so far ---\n{resp['output']}\n"
                f"--- domU {name} console (tail) ---\n{self.domu_console(name)[-3000:]}\n"
                + self.diagnostics(3000)
            )
        return resp["rc"], resp["output"]

    def domu_check(self, cmd: str, timeout: float = 120, name: str = "domu1") -> str:
        rc, out = self.domu(cmd, timeout, name)
        if rc != 0:
            raise XenCommandError(f"domU {name}", cmd, rc, out)
        return out


__all__ = [
    "XenCommandError",
    "XenError",
    "XenHost",
    "XenImages",
    "XenTimeout",
    "XenUnavailable",
    "build_xen_images",
    "default_cache_dir",
]
