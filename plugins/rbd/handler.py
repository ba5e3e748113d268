"""The ``rbd`` handler: a Ceph RBD image as a ublk device, through librbd's asynchronous API.

Two data paths:

* native (the default, ``native: true``): the runner calls ``RbdHandler.attach_queue`` on
  each queue thread and then hands every batch of requests to C (``rbdio.c``) in one call; C
  submits them to librbd's C API and librbd's completion callback copies read data into the
  request and completes it through the core (``ubq_complete``). No Python runs per request,
  and librbd's threads never take the GIL. The image is opened a second time for this, on a
  connection of its own (the Python binding does not expose its ``rbd_image_t``), after the
  Python open below has checked every option and explained any error. If the extension
  (``_rbdio``, built with the core) or librbd's C API is missing, the device falls back to
  the Python path with a warning.
* Python (``native: false``, and the handler API used without the runner): every IO method
  submits one librbd ``aio_*`` call and returns a small future (``RbdOp``) that librbd's
  completion thread resolves; the runner hands the completion back to the queue thread
  (``DeviceServer._later``).

Either way each queue keeps up to its depth of requests in flight. ``thread_model =
"parallel"``: librbd's image handle is thread-safe and the handler keeps no per-request state
outside the future (Python) or the per-tag op record (native).

Configuration::

    devices:
      - name: vm-disk
        handler: rbd
        queues: 2
        depth: 64
        options:
          pool: rbd
          image: vm-disk          # namespace: ns1   snapshot: s1 (read-only)
          conf: /etc/ceph/ceph.conf
          client: ublk            # or client.ublk; default client.admin
          keyring: /etc/ceph/ceph.client.ublk.keyring
          timeout: 30             # connect + open bound, seconds
          io_timeout: 0           # per-request deadline, 0 = wait for the cluster
          ceph_options: ["rbd_cache=false"]
          native: true            # false: Python data path (slower, see docs/performance.rst)

Size comes from the image (a smaller ``size:`` in the config is honoured, a larger one is an
error); the logical block size from the config (default 512), the physical block size is at
least 4096. ``discard_granularity`` (librbd's ``rbd_discard_granularity_bytes``, 64 KiB by
default) and ``max_discard_bytes`` are exposed as instance attributes for the runner.

Data path and copies:

* native path: librbd reads into a per-tag staging buffer and the callback copies it into
  the request (``ubq_copy_to_req``: one ``pwrite`` on the ublk char device in user-copy
  mode); a write is copied from the request into the staging buffer on the queue thread
  and librbd copies it once more at submission. The staging buffer stays with an op that
  the deadline failed until librbd lets go of it.
* read (Python path): ``Image.aio_read`` cannot read into a caller buffer (the binding allocates a
  ``bytes`` per read, see backend.py), so the completion callback copies it once into the
  request's ublk buffer, then resolves the future. That memcpy is the only copy.
* write (Python path): the binding wants ``bytes``; the request's read-only memoryview is copied once to
  bytes at submission (and librbd copies again internally: rbd_disable_zero_copy_writes).
* flush -> ``aio_flush``; FUA write -> ``aio_write`` with LIBRADOS_OP_FLAG_FADVISE_FUA;
  discard -> ``aio_discard`` (advisory, below ``discard_granularity`` librbd keeps the data,
  which discard semantics allow); write_zeroes -> ``aio_write_zeroes`` (exact; with
  ``may_unmap`` false the thick-provision flag keeps the objects allocated).

Cache: librbd's default cache (``rbd_cache=true``, policy writearound) completes plain
writes before the OSDs have them, so the device advertises a volatile write cache and FUA
(``can_flush``/``can_fua``) and passes both through. Add ``rbd_cache=false`` to
``ceph_options`` for write-through.

Deadlines: ``timeout`` bounds connecting and opening (monitors, auth, image header).
``io_timeout`` (seconds, 0 = wait for the cluster to recover, like the kernel's rbd driver)
is the device's IO deadline: it is passed to librados as ``rados_osd_op_timeout`` and, on top
of that, a watchdog fails any request still pending ``io_timeout + grace`` seconds after
submission with EIO (librbd can hold a request outside the OSD op timeout, e.g. while
waiting for the exclusive lock). A read failed by the watchdog never touches its buffer
afterwards: the late completion is dropped. The native path does the same in C
(``rbdq_expire``, called by the same watchdog thread), which also logs native request errors
(counted in C, reported about once a second: "N request(s) failed; last: ...").

Speed: per request, librbd's own client threads (messenger and op thread) cost about three
times what the ublk side costs (queue thread plus the ublk driver's work), so give librbd
CPU before adding queues: one queue serves one device unless ``ublk-runner stats`` shows its
queue thread saturated. Measured against the other librbd-based block devices in one VM run
(docs/performance.rst, "The rbd handler"): 1.2x / 1.4x rbd-nbd and 1.0x / 1.4x tcmu-runner's
rbd handler for 4 KiB random read / write at QD64; the kernel's rbd client stays ahead
(0.6x / 0.8x of krbd), as it has no librbd to pay for.
"""
from __future__ import annotations

import errno as _errno
import logging
import os
import threading
import time
from typing import Any

from runner.handler import Handler, Opt

log = logging.getLogger("ublk_plugins.rbd")

RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1  # librbd.h; not exported by the Python binding
WATCHDOG_GRACE = 1.0  # seconds on top of io_timeout before the handler gives up itself


def _name_ok(what: str, value: str | None, allow_none: bool = True) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{what} is required")
    if value == "":
        raise ValueError(f"{what} must not be empty")
    bad = sorted({c for c in value if c in "/@\0"})
    if bad:
        raise ValueError(f"{what} {value!r} must not contain {' '.join(map(repr, bad))} "
                         f"(give pool, namespace, image and snapshot as separate options)")


def parse_ceph_options(items: list[str] | None) -> dict[str, str]:
    """``["rbd_cache=false", "mon_host=127.0.0.1"]`` -> dict; ValueError on a bad item."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(c.isspace() for c in key.replace(" ", "_")):
            raise ValueError(f"ceph_options item {item!r} is not KEY=VALUE (e.g. rbd_cache=false)")
        out[key] = value.strip()
    return out


class RbdOp:
    """A minimal future for one request: ``add_done_callback`` and ``result``, resolved once
    from whichever thread gets there first (librbd's completion thread or the watchdog)."""

    __slots__ = ("_lock", "_done", "_exc", "_callbacks", "buf", "deadline", "what")

    def __init__(self, what: str, buf=None, deadline: float = 0.0):
        self._lock = threading.Lock()
        self._done = False
        self._exc: BaseException | None = None
        self._callbacks: list | None = None
        self.buf = buf          # a read's destination (memoryview), None otherwise
        self.deadline = deadline
        self.what = what

    def add_done_callback(self, fn) -> None:
        with self._lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        fn(self)

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> None:
        if not self._done:
            raise RuntimeError("RbdOp.result() before completion")
        if self._exc is not None:
            raise self._exc

    def exception(self) -> BaseException | None:
        return self._exc

    def _resolve(self, exc: BaseException | None, data: bytes | None = None) -> bool:
        """Complete once; for a successful read copy ``data`` into ``buf`` first (under the
        lock, so a watchdog failure and a late copy never overlap). False if already done."""
        with self._lock:
            if self._done:
                return False
            if exc is None and self.buf is not None:
                try:
                    self.buf[:] = data
                except Exception as e:  # short read or similar: fail the request
                    exc = OSError(_errno.EIO, f"{self.what}: cannot fill the buffer: {e!r}")
            self.buf = None
            self._done = True
            self._exc = exc
            cbs, self._callbacks = self._callbacks, None
        for fn in cbs or ():
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - never into librbd's thread
                log.exception("rbd: done callback failed")
        return True


def _error(what: str, err: int) -> OSError:
    if err == _errno.ETIMEDOUT:
        return OSError(_errno.EIO, f"{what}: the cluster did not answer within io_timeout "
                                   f"(librados ETIMEDOUT)")
    return OSError(err, f"{what}: {os.strerror(err)}")


class RbdHandler(Handler):
    """``handler: rbd`` -- see the module docstring."""

    name = "rbd"
    API_VERSION = (1, 0)
    thread_model = "parallel"
    idempotent_writes = True
    options_schema = {
        "pool": Opt(str, required=True, help="RADOS pool holding the image"),
        "namespace": Opt(str, help="RBD namespace inside the pool (default: none)"),
        "image": Opt(str, required=True, help="RBD image name"),
        "snapshot": Opt(str, help="serve this snapshot of the image, read-only"),
        "conf": Opt(str, help="ceph.conf path (default: librados' search: $CEPH_CONF, "
                              "/etc/ceph/ceph.conf, ...)"),
        "client": Opt(str, help="client id ('ublk') or name ('client.ublk'); default client.admin"),
        "keyring": Opt(str, help="keyring file holding the client's key (default: from conf)"),
        "timeout": Opt(float, default=30.0, min=1, max=3600,
                       help="seconds allowed for connecting to the monitors and opening the image"),
        "io_timeout": Opt(float, default=0.0, min=0, max=86400,
                          help="seconds after which a request the cluster has not answered fails "
                               "with EIO (0: wait for the cluster to recover)"),
        "ceph_options": Opt(list[str], default=[],
                            help="extra Ceph settings as KEY=VALUE, e.g. rbd_cache=false"),
        "native": Opt(bool, default=True,
                      help="serve the device's requests in C through librbd's C API (the fast "
                           "path); false: through the Python binding (one Python callback per "
                           "request)"),
    }
    can_flush = True
    can_fua = True
    can_discard = True
    can_write_zeroes = True

    # -- configuration -------------------------------------------------------
    @classmethod
    def check_config(cls, options: dict[str, Any], device) -> None:
        _name_ok("pool", options["pool"], allow_none=False)
        _name_ok("image", options["image"], allow_none=False)
        _name_ok("namespace", options.get("namespace"))
        _name_ok("snapshot", options.get("snapshot"))
        client = options.get("client")
        if client is not None:
            from .backend import RbdError, normalize_client
            try:
                normalize_client(client)
            except RbdError as e:
                raise ValueError(str(e)) from None
        for what in ("conf", "keyring"):
            if options.get(what) == "":
                raise ValueError(f"{what} must not be empty (leave it out for the default)")
        parse_ceph_options(options.get("ceph_options"))
        if options.get("snapshot") is not None and device is not None and \
                getattr(device, "read_only", False) is False:
            # not an error: a snapshot is served read-only whatever the device says
            pass

    @classmethod
    def open(cls, options: dict[str, Any], device) -> "RbdHandler":
        cls.check_config(options, device)
        from .backend import RbdBackend, RbdError
        read_only = bool(device.read_only or options.get("snapshot"))
        try:
            backend = RbdBackend.open(
                options["pool"], options["image"], namespace=options.get("namespace"),
                snapshot=options.get("snapshot"), conf=options.get("conf"),
                client=options.get("client"), keyring=options.get("keyring"),
                timeout=options["timeout"], read_only=read_only,
                io_timeout=options["io_timeout"],
                options=parse_ceph_options(options.get("ceph_options")) or None)
        except RbdError as e:
            raise OSError(e.errno or _errno.EIO, f"rbd: {e}") from e
        try:
            h = cls(options, device, backend)
        except BaseException:
            backend.close(timeout=10)
            raise
        h._native_args = dict(
            client=options.get("client"), conf=options.get("conf"),
            keyring=options.get("keyring"), timeout=options["timeout"],
            pool=options["pool"], namespace=options.get("namespace"), image=options["image"],
            snapshot=options.get("snapshot"), read_only=read_only,
            options=parse_ceph_options(options.get("ceph_options")))
        return h

    def __init__(self, options: dict[str, Any], device, backend=None):
        super().__init__(options, device)
        if backend is None:
            raise TypeError("RbdHandler is made by RbdHandler.open()")
        self.backend = b = backend
        lbs = device.logical_block_size
        if b.size <= 0 or b.size % lbs:
            raise OSError(_errno.EINVAL, f"rbd: image {b.spec} size {b.size} is not a positive "
                                         f"multiple of the logical block size {lbs}")
        if device.size is not None and device.size != b.size:
            if device.size > b.size:
                raise OSError(_errno.EINVAL, f"rbd: size {device.size} is larger than image "
                                             f"{b.spec} ({b.size} bytes)")
        self.size = device.size or b.size
        self.logical_block_size = lbs
        # librbd writes whole 4 KiB pages best; objects are the allocation unit
        self.physical_block_size = max(device.physical_block_size, 4096, lbs)
        self.can_write = not b.read_only
        # Discard below rbd_discard_granularity_bytes is ignored by librbd (skip partial
        # discard); tell the kernel. A hint for the runner (see the report): it currently
        # advertises 4096 for every handler.
        gran = b.discard_granularity or b.object_size
        self.discard_granularity = max(4096, lbs, min(gran, b.object_size))
        self.max_discard_bytes = 1 << 30
        self.io_timeout = float(options["io_timeout"])
        self._pending: dict[int, RbdOp] = {}
        self._plock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog = None
        self.timed_out = 0
        self.native = bool(options.get("native", True))
        self._native_args: dict | None = None
        self._engine = None            # native.Engine, opened by the first attach_queue
        self._nqueues: list = []       # attached native.QueueSubmitter, under _nlock
        self._nlock = threading.Lock()
        self._native_failed = False
        self._native_errors = 0        # engine errors already logged
        if self.io_timeout > 0:
            self._start_watchdog()

    def _start_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name=f"rbd-watchdog-{self.device.name}")
            self._watchdog.start()

    # -- deadline ------------------------------------------------------------
    def _track(self, op: RbdOp) -> RbdOp:
        if self._watchdog is not None:
            op.deadline = time.monotonic() + self.io_timeout + WATCHDOG_GRACE
            with self._plock:
                self._pending[id(op)] = op
        return op

    def _untrack(self, op: RbdOp) -> None:
        if self._watchdog is not None:
            with self._plock:
                self._pending.pop(id(op), None)

    def _watch(self) -> None:
        period = min(0.5, max(0.05, self.io_timeout / 4)) if self.io_timeout > 0 else 1.0
        while not self._stop.wait(period):
            self._watch_native()
            now = time.monotonic()
            with self._plock:
                late = [op for op in self._pending.values() if op.deadline <= now]
                for op in late:
                    self._pending.pop(id(op), None)
            for op in late:
                if op._resolve(OSError(_errno.EIO, f"{op.what}: no answer from the cluster "
                                                   f"within io_timeout={self.io_timeout}s")):
                    self.timed_out += 1

    def _submit(self, what: str, fn, *args, buf=None, **kw) -> RbdOp:
        op = self._track(RbdOp(what, buf))

        def done(err, data=None):
            self._untrack(op)
            op._resolve(_error(what, err) if err else None, data)
        try:
            fn(*args, done, **kw)
        except BaseException as e:
            self._untrack(op)
            n = getattr(e, "errno", None)
            raise OSError(n if isinstance(n, int) and n > 0 else _errno.EIO, f"{what}: {e}") from e
        return op

    # -- native data path ---------------------------------------------------------
    def attach_queue(self, queue):
        """Called by the runner on each queue thread: a submitter that serves the queue's
        request batches in C (see rbdio.c), or None for the Python path (``native: false``,
        the extension not built, or librbd's C API not loadable)."""
        if not self.native or self._native_args is None or self._native_failed:
            return None
        from . import native
        with self._nlock:
            if self._engine is None:
                try:
                    self._engine = native.Engine.open(io_timeout=self.io_timeout,
                                                      **self._native_args)
                except Exception as e:  # noqa: BLE001 - the Python path still works
                    self._native_failed = True
                    log.warning("rbd %s: native data path unavailable, serving through the "
                                "Python binding: %s", self.backend.spec, e)
                    return None
                log.info("rbd %s: native data path (librbd C API, own connection)",
                         self.backend.spec)
            deadline = self.io_timeout + WATCHDOG_GRACE if self.io_timeout > 0 else 0.0
            sub = native.QueueSubmitter(self._engine, queue, deadline, self._detach)
            self._nqueues.append(sub)
            self._start_watchdog()  # deadlines and the error log of the native path
        return sub

    def _detach(self, sub) -> None:
        with self._nlock:
            if sub in self._nqueues:
                self._nqueues.remove(sub)
            sub.destroy()

    def _watch_native(self) -> None:
        eng = self._engine
        if eng is None:
            return
        with self._nlock:
            for sub in self._nqueues:
                self.timed_out += sub.expire()
        from .native import op_name
        st = eng.stats()
        if st["errors"] > self._native_errors:
            n = st["errors"] - self._native_errors
            self._native_errors = st["errors"]
            err = -st["last_err"]
            log.error("rbd %s: %d request(s) failed; last: %s at offset %d: %s (%d timed out "
                      "so far)", self.backend.spec, n, op_name(st["last_op"]),
                      st["last_off"], _errno.errorcode.get(err, err), st["timed_out"])

    def native_stats(self) -> dict | None:
        return self._engine.stats() if self._engine is not None else None

    # -- IO --------------------------------------------------------------------
    def read(self, offset: int, buf: memoryview) -> RbdOp:
        return self._submit("read", self.backend.aio_read, offset, len(buf), buf=buf)

    def write(self, offset: int, data: memoryview, fua: bool) -> RbdOp:
        return self._submit("write", self.backend.aio_write, offset, bytes(data), fua=fua)

    def flush(self) -> RbdOp:
        return self._submit("flush", self.backend.aio_flush)

    def discard(self, offset: int, length: int) -> RbdOp:
        return self._submit("discard", self.backend.aio_discard, offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool) -> RbdOp:
        flags = 0 if may_unmap else RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
        return self._submit("write_zeroes", self.backend.aio_write_zeroes, offset, length,
                            zero_flags=flags)

    # -- life cycle ------------------------------------------------------------
    def close(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(5)
        # IO the watchdog gave up on may still be inside librbd: wait a bounded time, and
        # if the cluster is still gone leave the image open (closing would block) -- the
        # backend raises EBUSY then, which the runner logs.
        wait = max(30.0, 2 * self.io_timeout)
        if self._engine is not None:
            self._watch_native()  # log the last errors
            with self._nlock:
                attached = len(self._nqueues)
            if attached:
                # a queue thread that never exited may still submit: keep the engine
                log.error("rbd %s: %d queue(s) still attached; leaving the native connection "
                          "open", self.backend.spec, attached)
            elif self._engine.close(timeout=wait):
                self._engine = None
            else:
                log.error("rbd %s: %d native IOs still in librbd after %.0fs; leaving the "
                          "native connection open", self.backend.spec,
                          self._engine.inflight(), wait)
        self.backend.close(timeout=wait)
