"""The control plane lives in the top-level folder api/ and installs as
blkserve.api (pyproject's package-dir), never as a top-level `api`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_folder_is_imported_as_blkserve_api_and_never_as_api(tmp_path):
    code = ("import importlib.util, blkserve.api, blkserve.api.app, blkserve.api.routes, "
            "blkserve.api.hypervisors; print(blkserve.api.__file__); "
            "print(importlib.util.find_spec('api'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split("\n")
    assert Path(out[0]).parent.name == "api", out
    if "site-packages" not in out[0]:  # an editable install: this checkout's folder
        assert Path(out[0]).resolve().parent == ROOT / "api", out
    assert out[1] == "None", out


def test_every_hypervisor_adapter_is_a_variant_of_the_attach_body():
    from blkserve.api import models
    from blkserve.api.hypervisors import ADAPTERS, Hypervisor

    variants = models.AttachmentCreate.__origin__.__args__
    assert [a.request_model for a in ADAPTERS.values()] == list(variants)
    for name, adapter in ADAPTERS.items():
        assert issubclass(adapter, Hypervisor) and adapter.name == name
        assert adapter.request_model.model_fields["hypervisor"].annotation.__args__ == (name,)


def test_an_installed_package_finds_its_bpf_program(tmp_path):
    """`blkserve trace` compiles ebpf/blkserve.bpf.c at load time: a package
    installed from a wheel (not this checkout) must carry it and find it."""
    import zipfile

    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel, = out.glob("blkserve-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        assert "blkserve/ebpf/blkserve.bpf.c" in z.namelist(), z.namelist()
        z.extractall(site)
    code = (f"import sys; sys.path.insert(0, {str(site)!r}); from blkserve import trace; "
            "print(trace.__file__); print(trace.BPF_SOURCE); print(trace.BPF_SOURCE.exists())")
    lines = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.split("\n")
    assert lines[0].startswith(str(site)), lines  # the installed copy, not the checkout
    assert lines[1].startswith(str(site)) and lines[2] == "True", lines
