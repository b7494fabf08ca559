"""Fixtures shared by the test modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest as g  # noqa: E402


@pytest.fixture(scope="session")
def guest_image():
    """The Debian guest kernel + initramfs, built once (cached on disk)."""
    try:
        return g.build_guest_image()
    except g.GuestUnavailable as e:
        pytest.skip(str(e))
