"""The engine's C test program, built by `make test-native`, run from pytest
too so a plain pytest run covers it; plus an import smoke test."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_smoke():
    import blkserve._native as native
    import blkserve.native  # noqa: F401

    assert hasattr(native.lib, "bs_queue_start")


def test_engine_c_tests():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) to build the engine's C tests")
    subprocess.run(["make", "-s", "build/test_engine"], cwd=ROOT, check=True)
    out = subprocess.run([str(ROOT / "build/test_engine")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "all checks passed" in out.stdout
