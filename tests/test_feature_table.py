"""The README's feature table, checked against live backends: every row's
blkserve and qemu-storage-daemon columns must match what each one offers."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402
from test_export import start_export, stop_export  # noqa: E402
from test_vhost_client_qsd import qsd  # noqa: E402,F401  (fixture)

README = Path(__file__).resolve().parent.parent / "README.md"
# A mark, not a skip in the test body: the qsd fixture runs first and cannot
# start a daemon that is not installed (the test errored instead of skipping).
pytestmark = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="qemu-storage-daemon not installed")


def table_rows() -> list[tuple[str, bool, int, bool, bool]]:
    """(name, is_protocol, bit, blkserve, qsd) for every row of the table."""
    text = README.read_text()
    body = text.split("<!-- feature-table:start -->")[1].split("<!-- feature-table:end -->")[0]
    rows = []
    for line in body.splitlines():
        m = re.match(r"\| (protocol )?`(\w+)`[^|]*\| (yes|no) \| (yes|no) \|", line)
        if not m:
            continue
        proto, name = bool(m.group(1)), m.group(2)
        if proto:
            bit = getattr(vc, f"PROTOCOL_F_{name}")
        elif name.startswith("BLK_"):
            bit = getattr(vc, f"BLK_F_{name[4:]}")
        else:
            bit = getattr(vc, f"F_{name}")
        rows.append((name, proto, bit, m.group(3) == "yes", m.group(4) == "yes"))
    assert len(rows) >= 20, "feature table not found in README"
    return rows


def offers(path: str) -> tuple[int, int]:
    c = vc.VhostUserClient(path, connect_retry=5.0)
    try:
        return c.get_features(), c.get_protocol_features()
    finally:
        c.close()


def test_readme_feature_table_matches_both_backends(tmp_path, qsd):  # noqa: F811
    e = start_export(tmp_path)
    try:
        ours = offers(e.sock)
    finally:
        assert stop_export(e) == 0
    theirs = offers(qsd.sock)
    wrong = []
    for name, proto, bit, want_ours, want_theirs in table_rows():
        for who, (feat, pfeat), want in (("blkserve", ours, want_ours),
                                         ("qemu-storage-daemon", theirs, want_theirs)):
            have = bool((pfeat if proto else feat) >> bit & 1)
            if have != want:
                wrong.append(f"{'protocol ' if proto else ''}{name}: README says "
                             f"{'yes' if want else 'no'} for {who}, it offers "
                             f"{'yes' if have else 'no'}")
    assert not wrong, "\n".join(wrong)
