"""Python side of the rbd handler's native data path (rbdio.c, built as ``_rbdio``).

:class:`Engine` is a second connection to the cluster with the image open through librbd's C
API; :class:`QueueSubmitter` serves one ublk queue's request batches with it (the runner calls
``submit(queue.raw_requests, n)`` per batch, see ``DeviceServer._serve_native``).  Requests are
completed by C code on librbd's threads through the core's ``ubq_complete``; no Python runs per
request.
"""
from __future__ import annotations

import errno as _errno
import math
import time

from .backend import RbdError, normalize_client

try:
    from ._rbdio import ffi, lib
except ImportError as e:  # pragma: no cover - not built
    ffi = lib = None
    _import_error = e
else:
    _import_error = None

OP_NAMES = {0: "read", 1: "write", 2: "flush", 3: "discard", 5: "write_zeroes"}


def op_name(op: int) -> str:
    return OP_NAMES.get(op, f"op {op}")


def available() -> str | None:
    """None if the native path can be used, else why not."""
    if lib is None:
        return f"the _rbdio extension is not built ({_import_error})"
    ret = lib.rbdio_load()
    if ret < 0:
        return "librbd.so.1/librados.so.2 not loadable or missing symbols"
    return None


class Engine:
    """One cluster connection and one open image, for native IO."""

    def __init__(self, ptr, spec: str):
        self._e = ptr
        self.spec = spec

    @classmethod
    def open(cls, *, pool: str, image: str, namespace: str | None = None,
             snapshot: str | None = None, conf: str | None = None, client: str | None = None,
             keyring: str | None = None, timeout: float = 30, read_only: bool = False,
             io_timeout: float = 0, options: dict | None = None) -> "Engine":
        """Open like :meth:`RbdBackend.open` (which has already checked every argument and
        explained any error): the same config file, options and timeouts."""
        why = available()
        if why:
            raise RbdError(why, _errno.ENOSYS)
        name = normalize_client(client)
        options = dict(options or {})
        secs = str(int(math.ceil(timeout)))
        settings = list(options.items())
        if keyring is not None:
            settings.append(("keyring", keyring))
        settings += [("client_mount_timeout", secs), ("rados_mon_op_timeout", secs),
                     ("rados_osd_op_timeout", secs)]
        has_mons = any(k.replace(" ", "_") in ("mon_host", "mon_dns_srv_name") for k in options)
        keep = [ffi.new("char[]", str(x).encode()) for kv in settings for x in kv]
        keys = ffi.new("char *[]", keep[0::2])
        vals = ffi.new("char *[]", keep[1::2])

        def c(x):
            return ffi.new("char[]", x.encode()) if x else ffi.NULL
        # conf None: librados' default search, unless the options name the monitors
        read_conf = int(conf is not None or not has_mons)
        pp = ffi.new("struct rbdio **")
        ret = lib.rbdio_open(pp, c(name), read_conf, c(conf), keys, vals, len(settings),
                             c(pool), c(namespace), c(image), c(snapshot),
                             int(bool(read_only or snapshot)))
        if ret < 0:
            raise RbdError(f"native open of {pool}/{image}: {_errno.errorcode.get(-ret, -ret)}",
                           -ret)
        spec = f"{pool}/{image}"
        eng = cls(pp[0], spec)
        ret = lib.rbdio_set_option(eng._e, b"rados_osd_op_timeout",
                                   str(int(math.ceil(io_timeout))).encode())
        if ret < 0:
            eng.close(0)
            raise RbdError(f"native: setting rados_osd_op_timeout: {ret}", -ret)
        return eng

    def inflight(self) -> int:
        return int(lib.rbdio_inflight(self._e)) if self._e is not None else 0

    def stats(self) -> dict:
        st = ffi.new("struct rbdio_stats *")
        lib.rbdio_get_stats(self._e, st)
        return {k: int(getattr(st, k)) for k in ("inflight", "errors", "timed_out", "late",
                                                  "last_err", "last_op", "last_off")}

    def close(self, timeout: float | None = 30) -> bool:
        """Wait up to ``timeout`` s for IO inside librbd, then close.  False (still open) if
        IO is still in flight: closing would block until the cluster answers."""
        if self._e is None:
            return True
        end = None if timeout is None else time.monotonic() + timeout
        while lib.rbdio_inflight(self._e) > 0:
            if end is not None and time.monotonic() >= end:
                return False
            time.sleep(0.02)
        if lib.rbdio_close(self._e) < 0:
            return False
        self._e = None
        return True


class QueueSubmitter:
    """Serves one queue natively; made by ``RbdHandler.attach_queue``."""

    def __init__(self, engine: Engine, queue, deadline: float, on_detach):
        api = queue.native_api()
        pp = ffi.new("struct rbdq **")
        ret = lib.rbdq_create(pp, engine._e, ffi.cast("void *", api["queue"]),
                              ffi.cast("void *", api["complete"]),
                              ffi.cast("void *", api["copy_to_req"]),
                              ffi.cast("void *", api["copy_from_req"]), api["depth"],
                              float(deadline))
        if ret < 0:
            raise OSError(-ret, "rbdq_create")
        self._rq = pp[0]
        self._on_detach = on_detach
        raw = queue.raw_requests
        import runner.core as core  # the requests live in the core's cffi module
        raw_ptr = ffi.cast("struct rbdio_req *", int(core.ffi.cast("uintptr_t", raw)))
        rq, sub = self._rq, lib.rbdq_submit

        def submit(reqs, n):
            if reqs is not raw:
                raise ValueError("submit() takes the attached queue's raw_requests")
            sub(rq, raw_ptr, n)
        self.submit = submit

    def expire(self) -> int:
        """Fail requests past their deadline with EIO (watchdog thread)."""
        if self._rq is None:
            return 0
        return max(0, lib.rbdq_expire(self._rq))

    def detach(self) -> None:
        self._on_detach(self)

    def destroy(self) -> None:
        if self._rq is not None:
            lib.rbdq_destroy(self._rq)
            self._rq = None
