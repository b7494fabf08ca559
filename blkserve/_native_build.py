"""cffi build script for blkserve._native (API/out-of-line mode).

The C engine's whole Python boundary is native/blkserve_native.h, which
cdef() reads as it is; the engine's C files are compiled into the extension
and linked against liburing.  Run as a script (`python _native_build.py
OUTDIR`) it builds the extension into OUTDIR, e.g. a sanitizer build for
`make asan` with BLKSERVE_SANITIZE=address,undefined.
"""

import os
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
SOURCES = ["mem.c", "virtq.c", "blk.c", "core.c", "qos.c", "engine.c", "ring_split.c",
           "ring_packed.c", "vq_log.c", "rbd.c",
           "blkif.c", "blkif_req.c", "bench.c", "bench_vu.c", "bench_setup.c",
           "bench_report.c", "bench_blkif.c"]
SANITIZE = os.environ.get("BLKSERVE_SANITIZE", "")
SAN_FLAGS = [f"-fsanitize={SANITIZE}", "-fno-sanitize-recover=all",
             "-fno-omit-frame-pointer", "-g"] if SANITIZE else []


def make_builder(absolute: bool = False) -> FFI:
    # setuptools wants paths relative to the project; a script build may run
    # from anywhere.
    def path(p: Path) -> str:
        return str(p if absolute else p.relative_to(ROOT))

    builder = FFI()
    builder.cdef((NATIVE / "blkserve_native.h").read_text())
    builder.set_source(
        "blkserve._native",
        '#include <stdint.h>\n#include "blkserve_native.h"\n',
        sources=[path(NATIVE / s) for s in SOURCES],
        include_dirs=[path(NATIVE)],
        libraries=["uring", "rbd", "rados", "pthread"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", *SAN_FLAGS],
        extra_link_args=SAN_FLAGS,
    )
    return builder


ffibuilder = make_builder()

if __name__ == "__main__":
    import sys

    make_builder(absolute=True).compile(tmpdir=sys.argv[1] if len(sys.argv) > 1 else ".")
