"""The ``null`` handler: reads return whatever the kernel's pages held, writes are dropped.

Served entirely by the native core; requests never enter Python.  For tests it can inject a
latency on every request and an error on chosen operations.
"""
from __future__ import annotations

import errno

from runner.handler import Handler, Opt
from runner.hookspecs import hookimpl

OPS = {"read": 0, "write": 1, "flush": 2, "discard": 3, "write_zeroes": 5}


class NullHandler(Handler):
    name = "null"
    API_VERSION = (1, 0)
    size_required = True
    thread_model = "parallel"
    idempotent_writes = True
    options_schema = {
        "latency_us": Opt(int, default=0, min=0, max=10_000_000,
                          help="delay every request by this many microseconds (an io_uring timeout)"),
        "fail_ops": Opt(list[str], default=[], choices=sorted(OPS),
                        help="operations that fail instead of completing"),
        "error": Opt(str, default="EIO", help="errno name the failing operations return"),
    }
    can_write = can_flush = can_discard = can_write_zeroes = can_fua = True
    native_target = ("null", {})  # completed per instance with the injection options

    @classmethod
    def check_config(cls, options, device):
        if not isinstance(getattr(errno, options["error"], None), int):
            raise ValueError(f"error: {options['error']!r} is not an errno name (e.g. EIO, ENOSPC)")

    def __init__(self, options, device):
        super().__init__(options, device)
        self.native_target = ("null", {
            "latency_us": options["latency_us"],
            "error_ops": [OPS[o] for o in options["fail_ops"]],
            "error": getattr(errno, options["error"]),
        })


@hookimpl
def ublk_runner_register_handlers(registry):
    registry.add(NullHandler)
