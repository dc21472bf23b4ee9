"""cffi (API mode) builder for xen_vtpm._hashing; run by setup.py's cffi_modules.

``make_ffi`` also serves tests/test_hashing.py, which builds the same sources with the sanitizers.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["hashing.c", "sha256_lanes.c", "seal.c", "delta.c", "ingest.c", "restore.c"]
HEADERS = ["hashing.h", "sha256.h", "hashing_cdef.h", "cdc.h", "seal.h", "delta.h", "store.h", "store_cdef.h"]
WARNINGS = ["-Wall", "-Wextra", "-Werror"]


def make_ffi(extra_compile_args: Sequence[str] = ("-O3",), extra_link_args: Sequence[str] = ()) -> FFI:
    ffi = FFI()
    ffi.cdef((HERE / "hashing_cdef.h").read_text())
    ffi.cdef((HERE / "store_cdef.h").read_text())
    ffi.set_source(
        "xen_vtpm._hashing",
        '#include "hashing.h"\n#include "store.h"',
        sources=[str(HERE / name) for name in SOURCES],
        depends=[str(HERE / name) for name in HEADERS],
        include_dirs=[str(HERE)],
        libraries=["crypto", "pthread"],
        extra_compile_args=["-std=gnu11", *WARNINGS, *extra_compile_args],
        extra_link_args=list(extra_link_args),
    )
    return ffi


ffi = make_ffi()

if __name__ == "__main__":
    ffi.compile(verbose=True)
