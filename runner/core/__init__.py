"""The native core: ``ffi`` and ``lib`` from the cffi extension built from uring.c."""
from ._uring import ffi, lib

__all__ = ["ffi", "lib"]
