"""cffi (API mode) builder for xen_vtpm._hashing; run by setup.py's cffi_modules."""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffi = FFI()
ffi.cdef((HERE / "hashing.h").read_text())
ffi.set_source(
    "xen_vtpm._hashing",
    '#include <stdint.h>\n#include <stddef.h>\n#include "hashing.h"',
    sources=[str(HERE / "hashing.c"), str(HERE / "sha256_lanes.c")],
    include_dirs=[str(HERE)],
    libraries=["crypto", "pthread"],
    extra_compile_args=["-O3", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
