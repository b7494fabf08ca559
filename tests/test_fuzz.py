"""Bounded runs of the coverage-guided fuzzers over their committed seeds.

- native/fuzz/fuzz_chain.c: libFuzzer + ASan/UBSan over the engine's
  descriptor-chain walk and virtio-blk request parsing;
- tests/fuzz/fuzz_protocol.py: atheris over the vhost-user message parsing
  and a Session replaying whole message streams.

Each runs BLKSERVE_FUZZ_SECONDS (default 30) seconds; any crash, sanitizer
report or broken invariant fails the test and names the reproducer, which
`build/fuzz/fuzz_chain FILE` or `python tests/fuzz/fuzz_protocol.py FILE`
replays.  New inputs found here are kept under build/fuzz/ (not committed).
`make fuzz FUZZ_SECONDS=300` is the longer manual run.
"""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "fuzz"
SECONDS = int(os.environ.get("BLKSERVE_FUZZ_SECONDS", "30"))


def run_fuzzer(name: str, cmd: list[str], seeds: Path) -> None:
    work = BUILD / f"{name}-corpus"
    artifacts = BUILD / f"{name}-artifacts"
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir(parents=True)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="print_stacktrace=1")
    out = subprocess.run(
        cmd + [f"-max_total_time={SECONDS}", "-timeout=10", "-print_final_stats=1",
               f"-artifact_prefix={artifacts}/", str(work), str(seeds)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SECONDS * 3 + 120)
    found = sorted(artifacts.iterdir())
    final = [ln for ln in out.stderr.splitlines() if " DONE " in ln or "stat::" in ln]
    print(f"{name}:", *final, sep="\n  ")
    if out.returncode != 0 or found:
        tail = "\n".join(out.stderr.splitlines()[-60:])
        repro = ", ".join(str(p) for p in found) or "(none written)"
        pytest.fail(f"{name} fuzzer failed (exit {out.returncode}); reproducer: {repro}\n"
                    f"replay: {' '.join(cmd)} REPRODUCER\n{tail}", pytrace=False)


def libfuzzer_missing() -> str | None:
    if shutil.which("clang") is None:
        return "clang is not installed (Debian package clang; `make setup` installs it)"
    rt = subprocess.run(["clang", "--print-runtime-dir"], capture_output=True, text=True)
    lib = Path(rt.stdout.strip()) / f"libclang_rt.fuzzer-{platform.machine()}.a"
    if not lib.exists():
        return (f"libFuzzer runtime {lib} is missing (Debian package libclang-rt-14-dev; "
                "`make setup` installs it)")
    return None


def test_seed_corpora_match_generators(tmp_path):
    """The committed seeds are what the generators write (inputs found by
    fuzzing may be added next to them, so extra files are fine)."""
    for top in ("native", "tests"):
        gen, corpus = ROOT / top / "fuzz/gen_corpus.py", ROOT / top / "fuzz/corpus"
        out = tmp_path / top
        subprocess.run([sys.executable, str(gen), str(out)], check=True, cwd=ROOT)
        for seed in out.iterdir():
            committed = corpus / seed.name
            assert committed.exists(), f"{committed} missing: re-run {gen.relative_to(ROOT)}"
            assert committed.read_bytes() == seed.read_bytes(), \
                f"{committed} is stale: re-run {gen.relative_to(ROOT)}"


def test_fuzz_descriptor_chains():
    reason = libfuzzer_missing()
    if reason:
        pytest.skip(reason)
    subprocess.run(["make", "-s", "build/fuzz/fuzz_chain"], cwd=ROOT, check=True)
    run_fuzzer("chain", [str(BUILD / "fuzz_chain")], ROOT / "native/fuzz/corpus")


def test_fuzz_vhost_user_messages():
    pytest.importorskip("atheris", reason="atheris (PyPI) is not installed: "
                        "pip install -e '.[test]'")
    run_fuzzer("protocol", [sys.executable, str(ROOT / "tests/fuzz/fuzz_protocol.py")],
               ROOT / "tests/fuzz/corpus")
