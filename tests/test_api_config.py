"""The daemon's TOML config: the sample in deploy/ loads, mistakes are refused
with a message naming the key, the backing allow-list resolves symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blkserve.api import config

REPO = Path(__file__).resolve().parent.parent


def test_sample_config_loads_and_documents_every_setting():
    s = config.load(str(REPO / "deploy" / "blkserve.toml"))
    assert s.listen == config.DEFAULT_LISTEN and s.state_dir == "/var/lib/blkserve"
    text = (REPO / "deploy" / "blkserve.toml").read_text()
    for field in config.Settings.__dataclass_fields__:
        # [export] and [storage] keys are written without their prefix
        key = field.removeprefix("export_").removeprefix("storage_").removeprefix("rbd_")
        assert key in text, f"deploy/blkserve.toml does not document {key}"


def test_flags_override_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('listen = "127.0.0.1:9000"\nstate_dir = "/srv/x"\n')
    s = config.load(str(f), listen="127.0.0.1:9001", state_dir=None)
    assert s.host_port == ("127.0.0.1", 9001) and s.state_dir == "/srv/x"


@pytest.mark.parametrize("text,needle", [
    ("bogus = 1", "unknown key bogus"),
    ("listen = 5", "listen has the wrong type"),
    ('listen = "nohostport"', "HOST:PORT"),
    ('allowed_backings = ["relative/path"]', "absolute"),
    ("[export]\ncache = 'sometimes'", "export.cache"),
    ("[export]\npoll_us = -1", "export.poll_us"),
    ("[export]\nnope = 1", "export.nope"),
    ("[storage]\nbackend = 'nfs'", "storage.backend must be one of file, rbd"),
    ("[storage]\npool = 'a/b'", "storage.pool"),
    ("[storage]\nconf = 'ceph.conf'", "storage.conf must be an absolute path"),
    ("[storage]\ntimeout_s = 'x'", "storage.timeout_s has the wrong type"),
    ("[storage]\nnope = 1", "unknown key storage.nope"),
    ("detach_timeout_s = true", "wrong type"),
    ("this is not toml", "c.toml"),
])
def test_bad_config_is_refused_with_the_key(tmp_path, text, needle):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(config.ConfigError, match=needle):
        config.load(str(f))


def test_storage_table_and_rbd_allow_list(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('allowed_backings = ["rbd:rbd/vm-*", "/srv/x.img"]\n[storage]\n'
                 'backend = "rbd"\npool = "volumes"\nnamespace = "t1"\n'
                 'conf = "/etc/ceph/ceph.conf"\nclient_id = "blkserve"\ntimeout_s = 5\n')
    s = config.load(str(f))
    assert (s.storage_backend, s.rbd_pool, s.rbd_namespace, s.rbd_conf, s.rbd_client_id,
            s.rbd_timeout_s) == ("rbd", "volumes", "t1", "/etc/ceph/ceph.conf", "blkserve", 5)
    assert s.rbd_allowed("rbd:rbd/vm-1") and not s.rbd_allowed("rbd:rbd/other")
    assert not s.rbd_allowed("rbd:other/vm-1")
    assert not s.backing_allowed("/dev/vm-1")   # an rbd: pattern allows no path


def test_missing_config_file():
    with pytest.raises(config.ConfigError, match="cannot read config"):
        config.load("/nonexistent/blkserve.toml")


def test_allow_list_patterns_and_symlinks(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "disk.raw").write_bytes(b"")
    link = tmp_path / "link.raw"
    os.symlink(allowed / "disk.raw", link)
    (tmp_path / "other.raw").write_bytes(b"")
    s = config.Settings(allowed_backings=[f"{allowed}/*.raw"])
    assert s.backing_allowed(str(allowed / "disk.raw"))
    assert s.backing_allowed(str(link))  # resolves into the allowed dir
    assert not s.backing_allowed(str(tmp_path / "other.raw"))
    assert not config.Settings().backing_allowed(str(allowed / "disk.raw"))


def test_allow_list_checks_only_the_resolved_path(tmp_path):
    """A symlink planted in an allowed dir (by whoever may write there) does
    not allow what it points to; root's own links in a directory only root
    may write to, as udev's /dev/disk/by-id/*, stand for their target."""
    allowed = tmp_path / "allowed"
    allowed.mkdir(mode=0o755)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(b"")
    planted = allowed / "evil.raw"
    os.symlink(secret, planted)
    os.lchown(planted, 65534, 65534)
    s = config.Settings(allowed_backings=[f"{allowed}/*.raw"])
    assert not s.backing_allowed(str(planted))
    assert not s.backing_allowed(str(secret))
    # root's link, in a root-only directory: its target is what was allowed
    by_id = tmp_path / "by-id"
    by_id.mkdir(mode=0o755)
    os.symlink("../secret.raw", by_id / "nvme-x")
    s = config.Settings(allowed_backings=[f"{by_id}/nvme-*"])
    assert s.backing_allowed(str(secret)) and s.backing_allowed(str(by_id / "nvme-x"))
    # the same link in a directory others may write to is not trusted
    os.chmod(by_id, 0o777)
    assert not s.backing_allowed(str(secret))
