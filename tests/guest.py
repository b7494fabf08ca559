"""Test-guest tooling: build a tiny Linux guest from Debian packages and drive
it under QEMU (TCG) with vhost-user-blk disks.

Public API:

* ``build_guest_image(cache_dir=None) -> GuestImage`` -- kernel + initramfs
  (busybox, virtio/ext4 modules, fio, e2fsprogs, util-linux tools), cached
  outside the repository and keyed on the kernel package version.
* ``Guest`` -- context manager booting QEMU; ``run()`` / ``check()`` execute
  shell command lines inside the guest, ``qmp()`` talks to the QMP monitor.
* ``StorageDaemon`` -- context manager running ``qemu-storage-daemon`` with a
  vhost-user-blk export (reference backend); ``BackendProcess`` is the
  generic "process that listens on a unix socket" helper it builds on.

Only the standard library is used here. Errors that mean "this machine
cannot run guests at all" raise ``GuestUnavailable`` whose message names the
missing capability; tests turn it into ``pytest.skip``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "guest_init.sh"

# Bump when the image recipe changes in a way not covered by the hashed
# inputs below (the init script, module and tool lists are hashed already).
RECIPE_VERSION = 2

DEFAULT_CACHE_DIR = "/var/cache/blkserve-tests"
KERNEL_PKG_RE = r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$"

# Modules the guest needs.  Each is either built into the kernel (then
# nothing to do) or a loadable module (then it and its dependencies are put
# into the initramfs and insmod'ed in dependency order).
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# Loaded if they exist as modules (ext4's soft dependency on crc32c).
OPTIONAL_MODULES = ("crc32c_generic",)
# Kernel options that must be built in (they cannot be modules).
REQUIRED_BUILTIN_CONFIG = (
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_DEVTMPFS",
    "CONFIG_PCIEPORTBUS",
    "CONFIG_HOTPLUG_PCI_PCIE",
    "CONFIG_SERIAL_8250_CONSOLE",
)

# Host binaries copied into the guest (with their shared libraries).
# Tests must call them by these absolute paths: busybox sh prefers applets.
GUEST_TOOLS = (
    "/usr/bin/fio",
    "/sbin/mkfs.ext4",
    "/sbin/mke2fs",
    "/sbin/e2fsck",
    "/sbin/blkdiscard",
    "/sbin/blockdev",
    "/usr/bin/sha256sum",
)
# Debian package providing each tool (installed on demand when missing).
TOOL_PACKAGES = {
    "/usr/bin/fio": "fio",
    "/sbin/mkfs.ext4": "e2fsprogs",
    "/sbin/mke2fs": "e2fsprogs",
    "/sbin/e2fsck": "e2fsprogs",
    "/sbin/blkdiscard": "util-linux",
    "/sbin/blockdev": "util-linux",
    "/usr/bin/sha256sum": "coreutils",
    "/bin/busybox": "busybox-static",
}
GUEST_FILES = ("/etc/mke2fs.conf",)

KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off "
    "tsc=reliable no_timer_check random.trust_cpu=on"
)
READY_MARKER = b"BLKSERVE_GUEST_READY"


class GuestUnavailable(RuntimeError):
    """This host lacks a capability needed to run test guests."""


class GuestError(RuntimeError):
    """Something went wrong inside/with the guest."""


class GuestCommandError(GuestError):
    def __init__(self, cmd: str, code: int, output: str):
        self.cmd, self.code, self.output = cmd, code, output
        super().__init__(f"guest command failed (exit {code}): {cmd}\n--- output ---\n{output}")


class GuestTimeout(GuestError):
    pass


def _run(argv, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    return subprocess.run(argv, **kw)


# --------------------------------------------------------------------------
# Image build
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    directory: Path
    package: str
    version: str
    kernel_release: str
    modules: tuple[str, ...]


def default_cache_dir() -> Path:
    env = os.environ.get("BLKSERVE_TEST_CACHE")
    if env:
        return Path(env)
    path = Path(DEFAULT_CACHE_DIR)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    return Path.home() / ".cache" / "blkserve-tests"


def _recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(str(RECIPE_VERSION).encode())
    h.update(INIT_SCRIPT.read_bytes())
    h.update(KERNEL_CMDLINE.encode())
    for item in REQUIRED_MODULES + OPTIONAL_MODULES + GUEST_TOOLS + GUEST_FILES:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:12]


def apt_candidates(name_re: str) -> dict[str, str]:
    """{package: candidate version} of the packages whose name matches
    NAME_RE (one apt-cache call, ~1 s: --full prints the candidate record)."""
    res = _run(["apt-cache", "search", "--names-only", "--full", name_re])
    found: dict[str, str] = {}
    for record in res.stdout.split("\n\n"):
        pkg = re.search(r"^Package:\s*(\S+)", record, re.M)
        ver = re.search(r"^Version:\s*(\S+)", record, re.M)
        if pkg and ver and re.match(name_re, pkg.group(1)):
            found.setdefault(pkg.group(1), ver.group(1))
    return found


def _find_kernel_package() -> tuple[str, str]:
    """Newest linux-image-6.1.0-N-cloud-amd64-unsigned: (name, version)."""
    if not shutil.which("apt-cache"):
        raise GuestUnavailable("apt-cache not installed (needed to fetch the guest kernel)")
    found = apt_candidates(KERNEL_PKG_RE)
    if not found:
        raise GuestUnavailable(
            "no linux-image-6.1.0-*-cloud-amd64-unsigned package known to apt "
            "(Debian bookworm apt sources needed for the guest kernel)"
        )
    name = max(found, key=lambda n: int(re.match(r"linux-image-6\.1\.0-(\d+)-", n).group(1)))
    return name, found[name]


def _apt_get_update() -> None:
    res = _run(["apt-get", "update"])
    if res.returncode != 0:
        raise GuestError(f"apt-get update failed:\n{res.stdout}{res.stderr}")


def _download_deb(name: str, version: str, dest: Path) -> Path:
    res = _run(["apt-get", "download", f"{name}={version}"], cwd=dest)
    if res.returncode != 0:
        raise GuestError(f"apt-get download {name}={version} failed:\n{res.stdout}{res.stderr}")
    debs = sorted(dest.glob(f"{name}_*.deb"))
    if not debs:
        raise GuestError(f"apt-get download produced no .deb for {name} in {dest}")
    return debs[0]


def _ensure_host_tools() -> None:
    missing = [p for p in GUEST_TOOLS + ("/bin/busybox",) if not os.path.exists(p)]
    if not missing:
        _check_busybox_static()
        return
    pkgs = sorted({TOOL_PACKAGES[p] for p in missing})
    if os.geteuid() != 0:
        raise GuestUnavailable(
            f"host tools missing for the guest image: {missing} (install {pkgs})"
        )
    res = _run(
        ["apt-get", "install", "-y", "--no-install-recommends", *pkgs],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if res.returncode != 0:
        raise GuestError(f"apt-get install {pkgs} failed:\n{res.stdout}{res.stderr}")
    still = [p for p in missing if not os.path.exists(p)]
    if still:
        raise GuestUnavailable(f"host tools missing for the guest image: {still}")
    _check_busybox_static()


def _check_busybox_static() -> None:
    if _elf_interp(Path("/bin/busybox")) is not None:
        raise GuestUnavailable("/bin/busybox is dynamically linked (busybox-static package needed)")


# --- ELF helpers (stdlib only) ---------------------------------------------


def _elf_sections(data: bytes) -> dict[str, bytes]:
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise ValueError("not an ELF64 file")
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = []
    for i in range(e_shnum):
        off = e_shoff + i * e_shentsize
        sh_name, _type, _flags, _addr, sh_offset, sh_size = struct.unpack_from("<IIQQQQ", data, off)
        headers.append((sh_name, sh_offset, sh_size))
    _, str_off, str_size = headers[e_shstrndx]
    strtab = data[str_off : str_off + str_size]
    out = {}
    for sh_name, sh_offset, sh_size in headers:
        name = strtab[sh_name : strtab.index(b"\0", sh_name)].decode()
        out[name] = data[sh_offset : sh_offset + sh_size]
    return out


def _elf_interp(path: Path) -> str | None:
    """PT_INTERP of an ELF64 executable, or None for static binaries."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise ValueError(f"{path} is not ELF")
    e_phoff = struct.unpack_from("<Q", data, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(e_phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == 3:  # PT_INTERP
            return data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    return None


def _read_module(path: Path) -> bytes:
    """Module contents, decompressed if the package ships .ko.xz/.gz/.zst."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if not shutil.which("zstd"):
            raise GuestUnavailable("zstd not installed (kernel modules are .ko.zst)")
        return subprocess.run(["zstd", "-dc", str(path)], check=True, stdout=subprocess.PIPE).stdout
    raise ValueError(f"unknown module format: {path}")


def _modinfo(data: bytes) -> dict[str, list[str]]:
    info: dict[str, list[str]] = {}
    for entry in _elf_sections(data).get(".modinfo", b"").split(b"\0"):
        if b"=" in entry:
            k, v = entry.decode(errors="replace").split("=", 1)
            info.setdefault(k, []).append(v)
    return info


def _modname(filename: str) -> str:
    return filename.split(".ko", 1)[0].replace("-", "_")


def _resolve_modules(moddir: Path) -> tuple[list[tuple[str, bytes]], dict]:
    """Return ([(name, ko_bytes)] in load order, report)."""
    builtin = set()
    bfile = moddir / "modules.builtin"
    if bfile.exists():
        builtin = {
            _modname(Path(line.strip()).name)
            for line in bfile.read_text().splitlines()
            if line.strip()
        }
    index = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        index[_modname(p.name)] = p

    cache: dict[str, tuple[bytes, list[str]]] = {}

    def load(name: str) -> tuple[bytes, list[str]]:
        if name not in cache:
            data = _read_module(index[name])
            deps = [d for dep in _modinfo(data).get("depends", []) for d in dep.split(",") if d]
            cache[name] = (data, [_modname(d) for d in deps])
        return cache[name]

    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in index:
            raise GuestError(f"kernel module {name} is neither built in nor in {moddir}")
        if name in visiting:
            raise GuestError(f"module dependency cycle at {name}")
        visiting.add(name)
        for dep in load(name)[1]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    report = {"builtin": [], "modules": []}
    for name in REQUIRED_MODULES:
        if name in builtin:
            report["builtin"].append(name)
        else:
            visit(name)
    for name in OPTIONAL_MODULES:
        if name in index and name not in builtin:
            visit(name)
    report["modules"] = order
    return [(n, load(n)[0]) for n in order], report


# --- shared-library collection ---------------------------------------------


def _ldd_deps(binary: str) -> list[str]:
    res = _run(["ldd", binary])
    out = []
    if res.returncode != 0:
        if "not a dynamic executable" in (res.stdout + res.stderr):
            return out
        raise GuestError(f"ldd {binary} failed: {res.stdout}{res.stderr}")
    for line in res.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            target = line.split("=>", 1)[1].strip().split(" (", 1)[0].strip()
            if target == "not found":
                raise GuestError(f"ldd {binary}: {line}")
            if target.startswith("/"):
                out.append(target)
        elif line.startswith("/"):
            out.append(line.split(" (", 1)[0].strip())
    return out


# Merged-/usr layout inside the guest, like Debian 12.
_USR_MERGED = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}


def _guest_path(host_path: str) -> str:
    """Map an absolute host path onto the guest's merged-/usr layout."""
    rel = host_path.lstrip("/")
    top, _, rest = rel.partition("/")
    if top in _USR_MERGED:
        rel = _USR_MERGED[top] + ("/" + rest if rest else "")
    return rel


# --- newc cpio writer ------------------------------------------------------


class _Cpio:
    def __init__(self, fobj):
        self.f = fobj
        self.ino = 1000
        self.seen: set[str] = set()

    def _hdr(self, name: str, mode: int, size: int, nlink=1, rdevmajor=0, rdevminor=0, mtime=0):
        self.ino += 1
        namez = name.encode() + b"\0"
        fields = (
            self.ino,
            mode,
            0,
            0,
            nlink,
            mtime,
            size,
            0,
            0,
            rdevmajor,
            rdevminor,
            len(namez),
            0,
        )
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.f.write(hdr + namez)
        self.f.write(b"\0" * ((-(len(hdr) + len(namez))) % 4))

    def _data(self, data: bytes):
        self.f.write(data)
        self.f.write(b"\0" * ((-len(data)) % 4))

    def _parents(self, name: str):
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, name: str, mode=0o755):
        if name in self.seen:
            return
        self._parents(name)
        self.seen.add(name)
        self._hdr(name, stat.S_IFDIR | mode, 0, nlink=2)

    def file(self, name: str, data: bytes, mode=0o644):
        if name in self.seen:
            return
        self._parents(name)
        self.seen.add(name)
        self._hdr(name, stat.S_IFREG | mode, len(data))
        self._data(data)

    def symlink(self, name: str, target: str):
        if name in self.seen:
            return
        self._parents(name)
        self.seen.add(name)
        t = target.encode()
        self._hdr(name, stat.S_IFLNK | 0o777, len(t))
        self._data(t)

    def chardev(self, name: str, major: int, minor: int, mode=0o600):
        if name in self.seen:
            return
        self._parents(name)
        self.seen.add(name)
        self._hdr(name, stat.S_IFCHR | mode, 0, rdevmajor=major, rdevminor=minor)

    def trailer(self):
        self._hdr("TRAILER!!!", 0, 0, nlink=1)
        self.f.write(b"\0" * ((-self.f.tell()) % 512))


class Initramfs:
    """A newc initramfs (gzip'ed unless compress=False), merged-/usr layout."""

    def __init__(self, path: Path, compress: bool = True):
        self._raw = open(path, "wb")
        self._gz = (
            gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6, mtime=0)
            if compress
            else None
        )
        self.c = _Cpio(self._gz or self._raw)
        self.libs: set[str] = set()
        for d in (
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/lib64",
            "proc",
            "sys",
            "dev",
            "tmp",
            "run",
            "mnt",
            "root",
            "etc",
            "var",
            "var/lib",
            "var/log",
        ):
            self.c.dir(d)
        for top, target in _USR_MERGED.items():
            self.c.symlink(top, target)
        self.c.symlink("var/run", "/run")
        self.c.symlink("var/lock", "/run/lock")
        self.c.chardev("dev/console", 5, 1)
        self.c.chardev("dev/null", 1, 3, mode=0o666)
        self.c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        self.c.file("etc/group", b"root:x:0:\n")

    def tree(self, root: Path, skip: tuple[str, ...] = ()) -> list[str]:
        """Add an extracted package tree; returns the guest paths added."""
        added = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(
                filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))]
            ):
                p = Path(dirpath, name)
                rel = p.relative_to(root).as_posix()
                if any(rel.startswith(s) for s in skip):
                    continue
                gp = _guest_path("/" + rel)
                if p.is_symlink():
                    self.c.symlink(gp, os.readlink(p))
                elif p.is_file():
                    self.c.file(gp, p.read_bytes(), mode=p.stat().st_mode & 0o7777)
                added.append(gp)
        return added

    def busybox(self, busybox: Path, skip: set[str] = frozenset()) -> None:
        """Busybox and a symlink per applet, except at paths already added
        or in SKIP (real tools added later take precedence)."""
        self.c.file("usr/bin/busybox", busybox.read_bytes(), mode=0o755)
        applets = _run([str(busybox), "--list-full"], check=True).stdout.split()
        for a in applets:
            gp = _guest_path("/" + a)
            if gp not in self.c.seen and gp not in skip:
                self.c.symlink(gp, "/usr/bin/busybox")

    def host_file(self, path: str, mode: int = 0o755) -> None:
        """A host file at its (merged-/usr) path; symlinks are followed."""
        self.c.file(_guest_path(os.path.normpath(path)), Path(path).read_bytes(), mode=mode)

    def modules(self, modules: list[tuple[str, bytes]], listfile: str) -> None:
        for name, data in modules:
            self.c.file(f"usr/lib/modules/{name}.ko", data)
        self.c.file(listfile, "".join(f"{n}.ko\n" for n, _ in modules).encode())

    def close(self, init: Path) -> None:
        self.c.file("init", init.read_bytes(), mode=0o755)
        self.c.trailer()
        if self._gz is not None:
            self._gz.close()
        self._raw.close()


def _write_initramfs(path: Path, modules: list[tuple[str, bytes]]) -> dict:
    img = Initramfs(path)
    # busybox + applet symlinks (host tools take precedence)
    img.busybox(Path("/bin/busybox"), skip={_guest_path(t) for t in GUEST_TOOLS})
    # host tools + shared libraries + ELF interpreter
    libs: set[str] = set()
    for tool in GUEST_TOOLS:
        gp = _guest_path(tool)
        if os.path.islink(tool):
            target = os.readlink(tool)
            img.c.symlink(gp, target)
            tool = os.path.join(os.path.dirname(tool), target)
            gp = _guest_path(os.path.normpath(tool))
        img.c.file(gp, Path(tool).read_bytes(), mode=0o755)
        libs.update(_ldd_deps(tool))
    for lib in sorted(libs):
        img.host_file(lib)
    for f in GUEST_FILES:
        if os.path.exists(f):
            img.host_file(f, mode=0o644)
    # kernel modules, flat, plus the load order
    img.modules(modules, "etc/guest-modules")
    img.close(INIT_SCRIPT)
    return {"libraries": sorted(libs)}


def _build_into(tmp: Path, name: str, version: str) -> dict:
    work = tmp / "work"
    work.mkdir()
    try:
        try:
            deb = _download_deb(name, version, work)
        except GuestError:
            if os.geteuid() != 0:
                raise
            _apt_get_update()
            deb = _download_deb(name, version, work)
        root = work / "root"
        _run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestError(f"no /boot/vmlinuz-* in {deb.name}")
        krel = vmlinuz[0].name[len("vmlinuz-") :]
        config = (root / "boot" / f"config-{krel}").read_text()
        missing = [
            opt for opt in REQUIRED_BUILTIN_CONFIG if not re.search(rf"^{opt}=y$", config, re.M)
        ]
        if missing:
            raise GuestError(f"kernel {krel} lacks built-in {missing}")
        moddir = next(
            p for p in (root / "lib/modules" / krel, root / "usr/lib/modules" / krel) if p.is_dir()
        )
        modules, report = _resolve_modules(moddir)
        shutil.copyfile(vmlinuz[0], tmp / "vmlinuz")
        extra = _write_initramfs(tmp / "initrd.gz", modules)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest = {
        "package": name,
        "version": version,
        "kernel_release": krel,
        "builtin": report["builtin"],
        "modules": report["modules"],
        "tools": list(GUEST_TOOLS),
        "cmdline": KERNEL_CMDLINE,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _image_from_dir(d: Path) -> GuestImage:
    m = json.loads((d / "manifest.json").read_text())
    return GuestImage(
        kernel=d / "vmlinuz",
        initrd=d / "initrd.gz",
        directory=d,
        package=m["package"],
        version=m["version"],
        kernel_release=m["kernel_release"],
        modules=tuple(m["modules"]),
    )


def _image_dirname(name: str, version: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", f"{name}_{version}")
    return f"{safe}_{_recipe_hash()}"


def _cached_images(cache: Path) -> list[Path]:
    """Complete images built with the current recipe, oldest first."""
    suffix = "_" + _recipe_hash()
    found = [
        d
        for d in cache.glob("linux-image-*")
        if d.name.endswith(suffix) and (d / "manifest.json").exists()
    ]
    return sorted(found, key=lambda d: d.stat().st_mtime)


def build_guest_image(cache_dir: str | os.PathLike | None = None) -> GuestImage:
    """Build (or reuse) the guest kernel + initramfs.

    Safe against concurrent callers: builds under an flock, into a temporary
    directory that is renamed into place when complete. When apt cannot
    provide the kernel (offline), the newest compatible cached image is used.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)

    try:
        name, version = _find_kernel_package()
    except GuestUnavailable:
        if cached := _cached_images(cache):
            return _image_from_dir(cached[-1])
        raise

    final = cache / _image_dirname(name, version)
    if (final / "manifest.json").exists():
        return _image_from_dir(final)

    for tool in ("apt-get", "dpkg-deb", "ldd"):
        if not shutil.which(tool):
            raise GuestUnavailable(f"{tool} not installed (needed to build the guest image)")
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "manifest.json").exists():  # someone else built it meanwhile
            return _image_from_dir(final)
        _ensure_host_tools()
        for stale in cache.glob(".build-*"):  # leftovers of killed builds
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            _build_into(tmp, name, version)
            os.chmod(tmp, 0o755)
            os.replace(tmp, final)
        except GuestError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if cached := _cached_images(cache):
                warnings.warn(
                    f"guest image build failed, using cached {cached[-1].name}: {e}", stacklevel=2
                )
                return _image_from_dir(cached[-1])
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return _image_from_dir(final)


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def short_socket_dir(prefix: str = "bs-") -> Path:
    """A short private directory for unix sockets (sun_path is 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=tempfile.tempdir or "/tmp"))


def wait_for_socket(
    path: str | os.PathLike,
    timeout: float,
    proc: subprocess.Popen | None = None,
    connect: bool = False,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
            if not connect or socket_accepts(path):
                return
        if proc is not None and proc.poll() is not None:
            raise GuestError(f"process exited with {proc.returncode} before creating {path}")
        if time.monotonic() > deadline:
            raise GuestTimeout(f"socket {path} did not appear within {timeout}s")
        time.sleep(0.05)


def socket_accepts(path: str | os.PathLike) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _qopt(value) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def _tail(path: Path, limit: int = 8000) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return data[-limit:].decode(errors="replace")


# --------------------------------------------------------------------------
# Backend processes
# --------------------------------------------------------------------------


class BackendProcess:
    """A process serving vhost-user on a unix socket; context manager."""

    def __init__(
        self,
        argv: list[str],
        socket_path: str | os.PathLike,
        log_path: str | os.PathLike | None = None,
        start_timeout: float = 30.0,
        env: dict | None = None,
        cwd: str | None = None,
        name: str | None = None,
    ):
        self.argv = [str(a) for a in argv]
        self.socket_path = Path(socket_path)
        self.log_path = (
            Path(log_path)
            if log_path
            else Path(tempfile.mkdtemp(prefix="backend-log-")) / "backend.log"
        )
        self.start_timeout = start_timeout
        self.env = env
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self.proc: subprocess.Popen | None = None

    def start(self) -> BackendProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
        )
        try:
            wait_for_socket(self.socket_path, self.start_timeout, self.proc)
        except GuestError as e:
            self.stop()
            raise GuestError(
                f"{self.name} failed to start: {e}\nargv: {self.argv}\n--- log ---\n"
                f"{_tail(self.log_path)}"
            ) from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return _tail(self.log_path, 20000)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class StorageDaemon(BackendProcess):
    """qemu-storage-daemon exporting IMAGE as vhost-user-blk on SOCKET.

    aio="auto" tries io_uring first and falls back to threads if this host
    refuses io_uring (e.g. seccomp in containers).
    """

    def __init__(
        self,
        image: str | os.PathLike,
        socket_path: str | os.PathLike,
        num_queues: int = 1,
        writable: bool = True,
        aio: str = "auto",
        cache_direct: bool = True,
        logical_block_size: int | None = None,
        log_path=None,
        extra_args: list[str] = (),
        locking: str | None = None,
    ):
        binary = shutil.which("qemu-storage-daemon")
        if not binary:
            raise GuestUnavailable("qemu-storage-daemon not installed")
        self.image, self.num_queues, self.writable = Path(image), num_queues, writable
        self.aio, self.cache_direct, self.lbs, self.extra = (
            aio,
            cache_direct,
            logical_block_size,
            list(extra_args),
        )
        self._binary = binary
        # locking="off": a second daemon may open the same image (the two
        # ends of a live migration each have their own export of one file)
        self.locking = locking
        self.socket_path = Path(socket_path)
        super().__init__(
            self._argv("io_uring" if aio == "auto" else aio),
            socket_path,
            log_path,
            name="qemu-storage-daemon",
        )

    def _argv(self, aio: str) -> list[str]:
        blockdev = (
            f"driver=file,node-name=file0,filename={_qopt(self.image)},"
            f"cache.direct={'on' if self.cache_direct else 'off'},aio={aio}"
        )
        if self.locking:
            blockdev += f",locking={self.locking}"
        export = (
            f"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={_qopt(self.socket_path)},"
            f"writable={'on' if self.writable else 'off'},num-queues={self.num_queues}"
        )
        if self.lbs:
            export += f",logical-block-size={self.lbs}"
        return [self._binary, "--blockdev", blockdev, "--export", export, *self.extra]

    def start(self) -> StorageDaemon:
        try:
            return super().start()
        except GuestError:
            if self.aio != "auto":
                raise
            self.argv = self._argv("threads")
            return super().start()


# --------------------------------------------------------------------------
# QMP
# --------------------------------------------------------------------------


class QMP:
    """Minimal synchronous QMP client."""

    def __init__(self, path: str | os.PathLike, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buf = b""
        self.events: list[dict] = []
        self.greeting = self._recv()
        self.execute("qmp_capabilities")

    def _recv(self) -> dict:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise GuestError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise GuestError(f"QMP {command} {arguments}: {reply['error']}")
            return reply.get("return")

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------
# Guest VM
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Disk:
    socket: str | os.PathLike
    num_queues: int | None = None
    props: dict = dataclasses.field(default_factory=dict)
    reconnect: int = 0  # chardev reconnect=N: QEMU re-dials a restarted backend


class Guest:
    """A QEMU/TCG guest with vhost-user-blk disks, driven over a serial shell.

    ``disks`` items are socket paths or ``Disk`` objects. Disk N gets chardev
    id ``cN`` and device id ``vdN`` (first disk appears as /dev/vda).
    ``hotplug_ports`` free pcie-root-ports ``hp0..`` are added for QMP
    device_add; see ``qmp()`` / ``qmp_path``.
    """

    def __init__(
        self,
        disks=(),
        *,
        image: GuestImage | None = None,
        smp: int = 2,
        mem: str = "512M",
        num_queues: int = 1,
        device_props: dict | None = None,
        hotplug_ports: int = 0,
        extra_args: list[str] = (),
        log_dir: str | os.PathLike | None = None,
        boot_timeout: float = 180.0,
        accel: str = "tcg",
        cmdline_extra: str = "",
        machine: str = "q35",
        incoming: str | None = None,
        cpu: str = "max",
    ):
        self.machine = machine
        self.cpu = cpu
        # "unix:PATH": a live-migration destination (-incoming); start() then
        # waits for no boot, the guest arrives with migrate() on the source
        self.incoming = incoming
        self.qemu = shutil.which("qemu-system-x86_64")
        if not self.qemu:
            raise GuestUnavailable("qemu-system-x86_64 not installed")
        self.image = image
        self.disks = [d if isinstance(d, Disk) else Disk(d) for d in disks]
        self.smp, self.mem, self.num_queues = smp, mem, num_queues
        self.device_props = dict(device_props or {})
        self.hotplug_ports = hotplug_ports
        self.extra_args = list(extra_args)
        self.boot_timeout = boot_timeout
        self.accel = accel
        self.cmdline_extra = cmdline_extra
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="guest-log-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.log_dir / "console.log"  # ttyS0: kernel console
        self.shell_log = self.log_dir / "shell.log"  # ttyS1: harness transcript
        self.qemu_log = self.log_dir / "qemu.log"
        self._sockdir = short_socket_dir("bs-guest-")
        self.qmp_path = self._sockdir / "qmp.sock"
        self.serial_path = self._sockdir / "ttyS1.sock"
        self.proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self._qmp: QMP | None = None
        self.hotplug_port_ids = [f"hp{i}" for i in range(hotplug_ports)]

    # -- lifecycle ---------------------------------------------------------

    def argv(self) -> list[str]:
        img = self.image
        args = [
            self.qemu,
            "-accel",
            self.accel,
            "-machine",
            self.machine,
            "-cpu",
            self.cpu,
            "-m",
            self.mem,
            "-smp",
            str(self.smp),
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-kernel",
            str(img.kernel),
            "-initrd",
            str(img.initrd),
            "-append",
            f"{KERNEL_CMDLINE} {self.cmdline_extra}".strip(),
            "-object",
            f"memory-backend-memfd,id=mem,size={self.mem},share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            f"file,id=con0,path={_qopt(self.console_log)}",
            "-serial",
            "chardev:con0",
            "-chardev",
            f"socket,id=ser1,path={_qopt(self.serial_path)},server=on,wait=on",
            "-serial",
            "chardev:ser1",
            "-qmp",
            f"unix:{_qopt(self.qmp_path)},server=on,wait=off",
        ]
        for i, disk in enumerate(self.disks):
            props = {
                "num-queues": disk.num_queues or self.num_queues,
                **self.device_props,
                **disk.props,
            }
            dev = f"vhost-user-blk-pci,id=vd{i},chardev=c{i}" + "".join(
                f",{k}={v}" for k, v in props.items()
            )
            chardev = f"socket,id=c{i},path={_qopt(disk.socket)}"
            if disk.reconnect:
                chardev += f",reconnect={disk.reconnect}"
            args += ["-chardev", chardev, "-device", dev]
        for i, pid in enumerate(self.hotplug_port_ids):
            args += ["-device", f"pcie-root-port,id={pid},bus=pcie.0,chassis={i + 1},slot={i + 1}"]
        if self.incoming:
            args += ["-incoming", self.incoming]
        return args + self.extra_args

    def start(self) -> Guest:
        if self.image is None:
            self.image = build_guest_image()
        argv = self.argv()
        (self.log_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
        self._qemu_log_f = open(self.qemu_log, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._qemu_log_f, stderr=subprocess.STDOUT
        )
        try:
            wait_for_socket(self.serial_path, 30, self.proc)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.connect(str(self.serial_path))
            self._shell_log_f = open(self.shell_log, "wb")
            self._reader = threading.Thread(
                target=self._read_loop, daemon=True, name="guest-serial"
            )
            self._reader.start()
            if self.incoming:
                # the shell (and its state) arrives with the RAM; QMP answers
                # while QEMU waits for the migration stream
                self.boot_time = None
                wait_for_socket(self.qmp_path, 30, self.proc)
                self.qmp("query-status")
                return self
            t0 = time.monotonic()
            self._wait_for(READY_MARKER, 0, self.boot_timeout)
            self.boot_time = time.monotonic() - t0
            self.run("true", timeout=60)  # sync with the shell
        except BaseException as e:
            diag = self.diagnostics()
            self.kill()
            if isinstance(e, (GuestError, OSError)):
                raise GuestError(f"guest failed to boot: {e}\n{diag}") from e
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, timeout: float = 10.0) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and release all resources."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except OSError:
                pass
            self._qmp = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
        if self._reader is not None:
            self._reader.join(5)
        for f in ("_qemu_log_f", "_shell_log_f"):
            if getattr(self, f, None) is not None:
                getattr(self, f).close()
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def poweroff(self, timeout: float = 60.0) -> int:
        """Clean guest shutdown (sync + poweroff); returns QEMU's exit code."""
        self._send(b"sync; poweroff -f\n")
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise GuestTimeout(
                f"guest did not power off within {timeout}s\n{self.diagnostics()}"
            ) from None
        finally:
            self.kill()

    def diagnostics(self) -> str:
        parts = [f"logs in {self.log_dir}"]
        if self.proc is not None and self.proc.poll() is not None:
            parts.append(f"QEMU exited with {self.proc.returncode}")
        parts.append("--- qemu.log ---\n" + _tail(self.qemu_log, 4000))
        parts.append("--- console (ttyS0) ---\n" + _tail(self.console_log, 8000))
        with self._cond:
            parts.append(
                "--- shell (ttyS1) ---\n" + bytes(self._buf[-4000:]).decode(errors="replace")
            )
        return "\n".join(parts)

    # -- serial shell ------------------------------------------------------

    def _read_loop(self):
        sock = self._sock
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                self._shell_log_f.write(chunk)
                self._shell_log_f.flush()
            with self._cond:
                if not chunk:
                    self._eof = True
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._cond.notify_all()

    def _send(self, data: bytes):
        self._sock.sendall(data)

    def _wait_for(self, pattern, start: int, timeout: float) -> re.Match | int:
        """Wait until bytes/regex appears in the buffer after ``start``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if isinstance(pattern, bytes):
                    idx = self._buf.find(pattern, start)
                    if idx >= 0:
                        return idx
                else:
                    m = pattern.search(self._buf, start)
                    if m:
                        return m
                if self._eof or (self.proc is not None and self.proc.poll() is not None):
                    raise GuestError(f"guest went away while waiting for {pattern!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GuestTimeout(f"timed out after {timeout}s waiting for {pattern!r}")
                self._cond.wait(min(left, 1.0))

    def run(self, cmd: str, timeout: float = 300.0) -> tuple[int, str]:
        """Run one shell command line (may be multi-line) in the guest.

        stdin is /dev/null; the shell state (cwd, variables) persists
        between calls. Returns (exit_code, combined stdout+stderr).
        """
        tok = uuid.uuid4().hex[:16]
        # Markers are split in the command text so an echo of the command
        # could never be mistaken for the marker itself.
        script = (
            f"printf '%s%s\\n' __BS_B_ {tok}__\n"
            f"{{\n{cmd}\n}} </dev/null\n"
            f"printf '\\n%s%s:%s\\n' __BS_E_ {tok}__ \"$?\"\n"
        )
        with self._cond:
            start = len(self._buf)
        self._send(script.encode())
        begin = f"__BS_B_{tok}__\n".encode()
        end_re = re.compile(rb"\n__BS_E_" + tok.encode() + rb"__:(\d+)\n")
        try:
            b = self._wait_for(begin, start, timeout)
            m = self._wait_for(end_re, b, timeout)
        except GuestTimeout:
            with self._cond:
                partial = bytes(self._buf[start:]).decode(errors="replace")
            self._interrupt()
            raise GuestTimeout(
                f"guest command timed out after {timeout}s: {cmd}\n--- output so far ---\n{partial}"
            ) from None
        with self._cond:
            out = bytes(self._buf[b + len(begin) : m.start()])
        return int(m.group(1)), out.decode(errors="replace").replace("\r\n", "\n")

    def _interrupt(self):
        """Best effort: ^C the running command and resync with the shell."""
        try:
            self._send(b"\x03")
            time.sleep(0.5)
            self.run("true", timeout=15)
        except GuestError:
            pass

    def check(self, cmd: str, timeout: float = 300.0) -> str:
        """Like run() but raises GuestCommandError on non-zero exit."""
        code, out = self.run(cmd, timeout)
        if code != 0:
            raise GuestCommandError(cmd, code, out)
        return out

    def wait_for_block_device(self, name: str = "vda", timeout: float = 60.0) -> None:
        """Wait until /dev/NAME exists in the guest."""
        tries = int(timeout * 10)
        self.check(
            f"( i=0; while [ ! -b /dev/{name} ]; do i=$((i+1)); "
            f"if [ $i -gt {tries} ]; then echo 'no /dev/{name}'; ls /dev; exit 1; fi; "
            f"sleep 0.1; done )",
            timeout=timeout + 30,
        )

    def reboot(self, timeout: float = 600.0) -> None:
        """Hard reset (QMP system_reset, the virtual reset button): the guest
        boots again from its kernel; returns when its control shell is back.
        Under TCG a reboot takes 5-20 s after a fresh boot, but 150-230 s
        after minutes of fio in the guest, on blkserve's disks and on
        qemu-storage-daemon's alike (the new kernel unpacked its initramfs
        in 137 s instead of 2 s, every disk backend idle), hence the long
        bound."""
        with self._cond:
            start = len(self._buf)
        self.qmp("set-action", reboot="reset")  # we run with -no-reboot
        self.qmp("system_reset")
        try:
            self._wait_for(b"BLKSERVE_GUEST_READY", start, timeout)
        except GuestTimeout:
            raise GuestTimeout(
                f"guest not back within {timeout}s of a reset\n{self.diagnostics()}"
            ) from None
        self.run("true", timeout=30)

    # -- QMP ---------------------------------------------------------------

    def qmp(self, command: str, **arguments):
        if self._qmp is None:
            self._qmp = QMP(self.qmp_path)
        return self._qmp.execute(command, **arguments)

    # -- live migration ----------------------------------------------------

    MIGRATION_DONE = ("completed", "failed", "cancelled")

    def migrate(
        self,
        uri: str,
        *,
        max_bandwidth: int | None = None,
        downtime_limit_ms: int | None = None,
        capabilities: dict | None = None,
    ) -> None:
        """Start migrating to URI (a destination Guest's ``incoming``);
        returns at once. max_bandwidth is in bytes/s; a low one makes the
        RAM copy take several dirty-sync iterations. The destination must
        have the identical devices (same disks, ids and props)."""
        if capabilities:
            self.qmp(
                "migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in capabilities.items()],
            )
        params = {}
        if max_bandwidth is not None:
            params["max-bandwidth"] = max_bandwidth
        if downtime_limit_ms is not None:
            params["downtime-limit"] = downtime_limit_ms
        if params:
            self.qmp("migrate-set-parameters", **params)
        self.qmp("migrate", uri=uri)

    def query_migrate(self) -> dict:
        return self.qmp("query-migrate") or {}

    def wait_migration(self, timeout: float = 300.0, until=None, poll: float = 0.2) -> dict:
        """Poll query-migrate until the migration ends (completed, failed,
        cancelled) or ``until(info)`` is true. Returns the last reply with
        "statuses" (every status seen, in order) and "max-dirty-sync-count"
        (RAM dirty-sync iterations seen) added."""
        deadline = time.monotonic() + timeout
        statuses: list[str] = []
        syncs = 0
        while True:
            info = self.query_migrate()
            status = info.get("status", "none")
            if not statuses or statuses[-1] != status:
                statuses.append(status)
            syncs = max(syncs, info.get("ram", {}).get("dirty-sync-count", 0))
            info = {**info, "statuses": statuses, "max-dirty-sync-count": syncs}
            if status in self.MIGRATION_DONE or (until is not None and until(info)):
                return info
            if time.monotonic() > deadline:
                raise GuestTimeout(f"migration not done after {timeout}s: {info}")
            time.sleep(poll)

    def migrate_cancel(self) -> None:
        self.qmp("migrate_cancel")

    def wait_running(self, timeout: float = 60.0) -> None:
        """Wait until QEMU reports the guest running (a destination after
        the switch-over, a source after a cancelled migration), then sync
        with its shell."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.qmp("query-status")
            if st.get("status") == "running":
                break
            if time.monotonic() > deadline:
                raise GuestTimeout(f"guest not running after {timeout}s: {st}")
            time.sleep(0.1)
        self.run("true", timeout=max(5.0, deadline - time.monotonic()))
