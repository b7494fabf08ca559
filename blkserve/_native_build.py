"""cffi build script for blkserve._native (API/out-of-line mode).

The C engine's whole Python boundary is native/blkserve_native.h, which
cdef() reads as it is; the engine's C files are compiled into the extension
and linked against liburing.
"""

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
SOURCES = ["mem.c", "virtq.c", "blk.c", "engine.c", "bench.c"]

ffibuilder = FFI()
ffibuilder.cdef((NATIVE / "blkserve_native.h").read_text())
ffibuilder.set_source(
    "blkserve._native",
    '#include <stdint.h>\n#include "blkserve_native.h"\n',
    sources=[str((NATIVE / s).relative_to(ROOT)) for s in SOURCES],
    include_dirs=[str(NATIVE.relative_to(ROOT))],
    libraries=["uring", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
