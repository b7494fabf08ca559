"""Opening a volume's backing without being redirected.

A backing path is opened as root, by the control plane (size probe, resize)
and by every export worker start.  Whoever can write to a directory on that
path could swap the file for a symlink, a hard link or a FIFO, and make root
serve, truncate or block on something else.  So a backing is opened only

- with no symlink anywhere in its path (openat2 RESOLVE_NO_SYMLINKS, else a
  component-by-component O_NOFOLLOW walk),
- after an O_PATH open and fstat showed a regular file or a block device (a
  FIFO, socket or character device is never opened for I/O, so opening one
  cannot block or have side effects),
- and, once the volume exists, only if it is still the inode recorded at
  creation (st_dev, st_ino)."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

BLKGETSIZE64 = 0x80081272
SYS_OPENAT2 = 437  # the same number on every architecture (unified syscall table)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
AT_FDCWD = -100
SYSFS_DEV_BLOCK = "/sys/dev/block"


class BackingError(Exception):
    """The backing cannot be used; the message says why and what to do."""

    def __init__(self, msg: str, errno_: int | None = None):
        super().__init__(msg)
        self.errno = errno_


@dataclass(frozen=True)
class Identity:
    """Which inode a backing is: device and inode number of the file (for a
    block device, of its node), its kind, and for a block device the
    device number it gives access to."""

    dev: int
    ino: int
    kind: str  # "file" | "block"
    rdev: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        blk = stat.S_ISBLK(st.st_mode)
        return cls(st.st_dev, st.st_ino, "block" if blk else "file", st.st_rdev if blk else 0)

    def text(self) -> str:
        """DEV:INO, as `blkserve export --backing-identity` takes it."""
        return f"{self.dev}:{self.ino}"


def parse_identity(text: str) -> tuple[int, int]:
    dev, sep, ino = text.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        raise ValueError(f"{text!r} is not DEV:INO (two decimal numbers)")
    return int(dev), int(ino)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2 = True


def _openat2(path: str, flags: int, mode: int) -> int:
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0,
                   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_long(AT_FDCWD),
                       ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                       ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fd


def _open_walk(path: str, flags: int, mode: int) -> int:
    """openat2's RESOLVE_NO_SYMLINKS for kernels before 5.6: every directory
    on the way opened O_NOFOLLOW|O_DIRECTORY from the one before, the last
    component O_NOFOLLOW (with O_PATH that yields the link itself, which the
    caller's fstat refuses)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OSError(errno.ELOOP, "'..' in a backing path", path)
    if not parts:
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    dirfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                              | os.O_CLOEXEC, dir_fd=dirfd)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=dirfd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                raise
            os.close(dirfd)
            dirfd = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW, mode, dir_fd=dirfd)
    finally:
        os.close(dirfd)


def open_nofollow(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open(PATH, FLAGS) that fails (ELOOP) if any component of the
    absolute PATH is a symlink."""
    global _have_openat2
    if not os.path.isabs(path):
        raise OSError(errno.EINVAL, "backing path is not absolute", path)
    flags |= os.O_CLOEXEC
    if _have_openat2:
        try:
            return _openat2(path, flags, mode)
        except OSError as e:
            if e.errno not in (errno.ENOSYS, errno.EPERM):  # EPERM: a seccomp filter
                raise
            _have_openat2 = False
    return _open_walk(path, flags, mode)


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a special file"


def _describe(path: str, e: OSError) -> BackingError:
    if e.errno == errno.ELOOP:
        return BackingError(f"backing {path} has a symbolic link in its path; a backing is "
                            "opened only by its real path (give the path the link points "
                            "to, and if the file was replaced by a link, put it back)",
                            e.errno)
    return BackingError(f"backing {path}: {e.strerror}", e.errno)


def check(path: str, expect: tuple[int, int] | None = None) -> Identity:
    """What PATH is, without opening it for I/O or following a symlink:
    BackingError unless it is a regular file or block device (and the
    inode EXPECT = (st_dev, st_ino), if given)."""
    try:
        fd = open_nofollow(path, os.O_PATH)
    except OSError as e:
        raise _describe(path, e) from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return _verify(path, st, expect)


def _verify(path: str, st: os.stat_result, expect: tuple[int, int] | None) -> Identity:
    if stat.S_ISLNK(st.st_mode):  # O_PATH|O_NOFOLLOW of the last component (no openat2)
        raise _describe(path, OSError(errno.ELOOP, os.strerror(errno.ELOOP)))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BackingError(f"backing {path} is {_kind_name(st.st_mode)}, neither a regular "
                           "file nor a block device (only those can back a volume)")
    ident = Identity.of(st)
    if expect is not None and (ident.dev, ident.ino) != tuple(expect):
        raise BackingError(f"backing {path} is no longer the file the volume was created on "
                           f"(device:inode {expect[0]}:{expect[1]} expected, found "
                           f"{ident.dev}:{ident.ino}): it was replaced; put the original "
                           "back, or delete the volume and create it again on this file")
    return ident


def open_checked(path: str, flags: int,
                 expect: tuple[int, int] | None = None) -> tuple[int, Identity]:
    """Open PATH for I/O with FLAGS (see check()): (fd, identity).  The fd
    is opened O_NONBLOCK, then made blocking once fstat proved it the same
    regular file or block device the O_PATH probe saw."""
    first = check(path, expect)
    try:
        fd = open_nofollow(path, flags | os.O_NONBLOCK)
    except OSError as e:
        raise _describe(path, e) from None
    try:
        ident = _verify(path, os.fstat(fd), expect or (first.dev, first.ino))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, ident


def size_of(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    return st.st_size


def whole_disk(rdev: int, sysfs: str = SYSFS_DEV_BLOCK) -> int:
    """The device number of the disk a partition RDEV is on (RDEV itself
    if it is not a partition)."""
    node = os.path.join(sysfs, f"{os.major(rdev)}:{os.minor(rdev)}")
    if not os.path.exists(os.path.join(node, "partition")):
        return rdev
    try:
        with open(os.path.join(os.path.realpath(node), "..", "dev")) as f:
            major, _, minor = f.read().strip().partition(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return rdev


def overlap(a: Identity, b: Identity, sysfs: str = SYSFS_DEV_BLOCK) -> str | None:
    """How A and B reach the same data: None, "same" (one inode, e.g. a hard
    link, or one block device under two nodes), "a-in-b" (A is a partition
    of disk B) or "b-in-a"."""
    if (a.dev, a.ino) == (b.dev, b.ino):
        return "same"
    if a.kind != "block" or b.kind != "block":
        return None
    if a.rdev == b.rdev:
        return "same"
    if whole_disk(a.rdev, sysfs) == b.rdev:
        return "a-in-b"
    if whole_disk(b.rdev, sysfs) == a.rdev:
        return "b-in-a"
    return None
