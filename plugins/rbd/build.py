"""cffi build script for the rbd handler's native data path (rbdio.c).

librbd/librados are dlopen()ed at run time, so building needs neither Ceph nor its headers;
the handler falls back to its Python path when the extension or librbd is missing.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def header_declarations(path: str) -> str:
    """rbdio.h without its preprocessor lines: cffi parses the rest as it is, so the header
    stays the one description of the interface (no second copy to drift)."""
    with open(path) as f:
        return "".join(line for line in f if not line.lstrip().startswith("#"))


CDEF = header_declarations(os.path.join(HERE, "rbdio.h"))

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "ublk_plugins.rbd._rbdio",
    '#include "rbdio.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "rbdio.c"))],
    include_dirs=[os.path.relpath(HERE)],
    libraries=["dl", "pthread"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
