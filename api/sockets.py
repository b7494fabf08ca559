"""Can a user reach an export socket?  The directories on the way to it
that a QEMU running as that user could not search, and the one permission
bit that lets it (libvirt runs QEMU unprivileged and does not chown
vhost-user sockets)."""

from __future__ import annotations

import logging
import os
import pwd
import stat

log = logging.getLogger("blkserve.libvirt")  # (where these lines came from first)


def _groups(uid: int, gid: int) -> set[int]:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return {gid}
    return set(os.getgrouplist(name, gid)) | {gid}


def can_search(st: os.stat_result, uid: int, groups: set[int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _has_acl(path: str) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False
    return True


def unreachable_dirs(path: str, owner: tuple[int, int]) -> list[str]:
    """The directories above PATH that OWNER's processes cannot search (by
    their mode bits; a directory with an ACL is taken to be searchable)."""
    uid, gid = owner
    groups = _groups(uid, gid)
    out = []
    d = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            st = os.stat(d)
        except OSError:
            st = None
        if st is not None and not can_search(st, uid, groups) and not _has_acl(d):
            out.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    return out


def grant_search(d: str, owner: tuple[int, int]) -> None:
    """Add the one permission bit that lets OWNER search directory D (its
    user, group or other execute bit, whichever class OWNER falls in)."""
    uid, gid = owner
    try:
        st = os.stat(d)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid in _groups(uid, gid):
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        os.chmod(d, stat.S_IMODE(st.st_mode) | bit)
    except OSError as e:
        log.warning("cannot give %s search permission on %s: %s", owner_name(owner), d,
                    e.strerror)
        return
    log.info("%s may now search %s (to reach export sockets)", owner_name(owner), d)


def owner_name(owner: tuple[int, int]) -> str:
    try:
        return f"uid {owner[0]} ({pwd.getpwuid(owner[0]).pw_name})"
    except KeyError:
        return f"uid {owner[0]}"
