"""Serving side of the embeddable ublk library: one :class:`Queue` per device queue.

A queue belongs to the thread that opened it (the kernel binds the queue to the task that fetched
its tags).  That thread calls :meth:`Queue.wait` in a loop, or, from an event loop, watches
:meth:`Queue.fileno` and calls :meth:`Queue.process`.  Requests may be completed from any thread:
completions from other threads are handed back to the owner by the native core.

Data moves with :meth:`Queue.read_data` (a WRITE's payload into a buffer the backend chose) and
the ``data`` argument of :meth:`Queue.complete` (a READ's result from the backend's buffer).  In
user-copy mode (the default on 6.5+) the core holds no data buffers at all; in buffer mode (older
kernels) each tag has one, exposed zero-copy by :meth:`Queue.buffer`.
"""
from __future__ import annotations

import errno as _errno
import threading
from array import array
from collections import namedtuple
from struct import Struct

from .core import ffi, lib

OP_READ = 0
OP_WRITE = 1
OP_FLUSH = 2
OP_DISCARD = 3
OP_WRITE_SAME = 4
OP_WRITE_ZEROES = 5
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush", OP_DISCARD: "discard",
            OP_WRITE_SAME: "write_same", OP_WRITE_ZEROES: "write_zeroes"}
F_FUA = 1 << 13
F_NOUNMAP = 1 << 15

NATIVE = {None: lib.UBQ_NATIVE_NONE, "null": lib.UBQ_NATIVE_NULL, "file": lib.UBQ_NATIVE_FILE}

_REQ = Struct("<QIIH6x")
assert _REQ.size == ffi.sizeof("struct ubq_req")


class QueueStopped(Exception):
    """The kernel aborted every tag of the queue: the device is stopping.  Close the queue."""


class Request(namedtuple("Request", "offset length op_flags tag")):
    """One block request: byte ``offset`` and ``length``, the op with its flags, and the tag that
    names it until it is completed."""
    __slots__ = ()

    @property
    def op(self) -> int:
        return self.op_flags & 0xFF

    @property
    def op_name(self) -> str:
        return OP_NAMES.get(self.op_flags & 0xFF, str(self.op_flags & 0xFF))

    @property
    def fua(self) -> bool:
        return bool(self.op_flags & F_FUA)

    @property
    def no_unmap(self) -> bool:
        return bool(self.op_flags & F_NOUNMAP)


_make_request = Request._make
_FORWARDED = lib.UBQ_REQ_FORWARDED


class Forwarded(namedtuple("Forwarded", "tag op host_offset result")):
    """A forwarded request finished (see :meth:`Queue.forward`): already committed to the kernel;
    ``result`` is what it was committed with (bytes or ``-errno``)."""
    __slots__ = ()


def _split_forwarded(reqs: list[Request]) -> tuple[list[Request], list[Forwarded]]:
    done = [Forwarded(r.tag, r.op_flags & 0xFF, r.offset, r.length - (1 << 32) if r.length >> 31 else r.length)
            for r in reqs if r.op_flags & _FORWARDED]
    if done:
        reqs = [r for r in reqs if not r.op_flags & _FORWARDED]
    return reqs, done


class Queue:
    """Queue ``q_id`` of ``device``; see the module docstring.

    ``native`` makes the core serve every request itself, so :meth:`wait` never returns any (it
    must still be called: it drives the queue):

    - ``"null"``: complete at once (the speed reference); ``native_options`` may hold
      ``latency_us``, ``error_ops`` (a set of op numbers) and ``error`` (an errno) to inject;
    - ``"file"``: io_uring reads/writes/fdatasync/fallocate on ``native_options["fd"]``.

    ``forward_fd``: a file (e.g. a disk image) that READ/WRITE requests may be forwarded to with
    :meth:`forward`: the core then moves the data between the request and that file itself.
    ``on_forwarded(list[Forwarded])`` is called from :meth:`wait`, on the owner thread, with the
    forwarded requests that have finished (before the new requests are returned).

    ``pollable=False`` promises the queue is only driven by :meth:`wait` (never through
    :meth:`fileno`); the ring then defers the kernel's completion work to that wait, which is
    cheaper (IORING_SETUP_DEFER_TASKRUN).
    """

    def __init__(self, device, q_id: int, *, native: str | None = None, native_options: dict | None = None,
                 batch: int | None = None, io_flusher: bool = True, pollable: bool = True,
                 forward_fd: int | None = None, on_forwarded=None):
        self.device = device
        self.q_id = q_id
        self.depth = device.info.depth
        self.max_io_bytes = device.info.max_io_bytes
        if native not in NATIVE:
            raise ValueError(f"unknown native target {native!r}; known: {sorted(k for k in NATIVE if k)}")
        pp = ffi.new("struct ubq **")
        ret = lib.ubq_open(pp, device.cdev_fd, q_id, self.depth, self.max_io_bytes, device.info.flags,
                           int(pollable))
        if ret < 0:
            raise OSError(-ret, f"opening queue {q_id} of ublk device {device.dev_id}: {_errno.errorcode.get(-ret)}")
        self._q = pp[0]
        opts = native_options or {}
        if native == "null":
            ret = lib.ubq_set_native_null(self._q, int(opts.get("latency_us", 0)),
                                          sum(1 << op for op in opts.get("error_ops", ())),
                                          int(opts.get("error", _errno.EIO)))
        elif native == "file":
            ret = lib.ubq_set_native_file(self._q, opts["fd"])
        else:
            ret = 0
        if ret < 0:
            lib.ubq_close(self._q)
            raise OSError(-ret, f"setting up the native {native} target of queue {q_id}")
        self._fwd_tags = array("H")
        self._fwd_hosts = array("Q")
        self._on_forwarded = on_forwarded
        self.forwarding = forward_fd is not None
        if self.forwarding:
            ret = lib.ubq_set_forward_fd(self._q, forward_fd)
            if ret < 0:
                lib.ubq_close(self._q)
                raise OSError(-ret, f"registering the forward fd of queue {q_id}: {_errno.errorcode.get(-ret)}")
        if io_flusher:
            lib.ub_set_io_flusher()  # needs CAP_SYS_RESOURCE; harmless without
        self._owner = threading.get_ident()
        n = batch or self.depth
        self._out = ffi.new("struct ubq_req[]", n)
        self._out_buf = ffi.buffer(self._out)
        self._max_out = n
        self._done_tags = array("H")
        self._done_res = array("i")
        self.closed = False
        ret = lib.ubq_fetch_all(self._q)
        if ret < 0:
            lib.ubq_close(self._q)
            self.closed = True
            raise OSError(-ret, f"FETCH_REQ on queue {q_id} of ublk device {device.dev_id} failed")

    # ---- the loop
    def wait(self, timeout: float | None = None) -> list[Request]:
        """Commit what was completed on this thread, then wait up to ``timeout`` seconds (None:
        until something happens; a signal also returns early) for requests.  Returns them (maybe
        an empty list).  Raises :class:`QueueStopped` once the device is stopping and every tag
        has been aborted.  The GIL is released while waiting."""
        ret = self._run(timeout)
        if ret > 0:
            reqs = list(map(_make_request, _REQ.iter_unpack(self._out_buf[: ret * 24])))
            if self.forwarding:
                reqs, done = _split_forwarded(reqs)
                if done and self._on_forwarded is not None:
                    self._on_forwarded(done)
            return reqs
        return []

    def wait_raw(self, timeout: float | None = None) -> int:
        """:meth:`wait` without building Python objects: the requests stay in
        :attr:`raw_requests` (the core's ``struct ubq_req[]``, valid until the next wait) and
        the count is returned.  For handlers that serve a whole batch in native code (see
        :meth:`native_api`)."""
        return self._run(timeout)

    @property
    def raw_requests(self):
        return self._out

    def native_api(self) -> dict:
        """Addresses (ints) for native code that completes this queue's requests itself: the
        ``struct ubq *`` and the core's ``ubq_complete``, ``ubq_copy_to_req`` and
        ``ubq_copy_from_req`` (all callable from any thread, see uring.h).  Valid until
        :meth:`close`."""
        def addr(x):
            return int(ffi.cast("uintptr_t", x))
        return {"queue": addr(self._q), "complete": addr(ffi.addressof(lib, "ubq_complete")),
                "copy_to_req": addr(ffi.addressof(lib, "ubq_copy_to_req")),
                "copy_from_req": addr(ffi.addressof(lib, "ubq_copy_from_req")),
                "depth": self.depth}

    def _run(self, timeout: float | None) -> int:
        if self._fwd_tags:
            self._flush_forwards()
        tags, res = self._done_tags, self._done_res
        n_done = len(tags)
        ms = -1 if timeout is None else int(timeout * 1000)
        if n_done:
            ret = lib.ubq_run(self._q, ffi.from_buffer("uint16_t[]", tags), ffi.from_buffer("int32_t[]", res),
                              n_done, self._out, self._max_out, ms)
            del tags[:]
            del res[:]
        else:
            ret = lib.ubq_run(self._q, ffi.NULL, ffi.NULL, 0, self._out, self._max_out, ms)
        if ret >= 0:
            return ret
        if ret == -_errno.ENODEV:
            raise QueueStopped(f"queue {self.q_id} of ublk device {self.device.dev_id} stopped")
        raise OSError(-ret, f"io_uring wait on queue {self.q_id}: {_errno.errorcode.get(-ret)}")

    def process(self) -> list[Request]:
        """Non-blocking :meth:`wait`, for event loops after :meth:`fileno` became readable."""
        return self.wait(0)

    def fileno(self) -> int:
        """An fd that becomes readable when :meth:`process` has something to do (owner thread)."""
        fd = lib.ubq_poll_fd(self._q)
        if fd < 0:
            raise OSError(-fd, "registering the queue's eventfd")
        return fd

    # ---- completing
    def complete(self, req: Request, result: int, data=None) -> None:
        """Complete ``req`` with ``result``: bytes transferred for READ/WRITE, 0 for the others,
        or ``-errno``.  ``data`` (READ only) is copied into the request first: any object with the
        buffer protocol.  Callable from any thread; from the owner it costs no system call."""
        if data is not None:
            self.write_data(req, data)
        if threading.get_ident() == self._owner:
            self._done_tags.append(req.tag)
            self._done_res.append(result)
        else:
            ret = lib.ubq_complete(self._q, req.tag, result)
            if ret < 0:
                raise OSError(-ret, f"tag {req.tag} of queue {self.q_id} is not held by the backend")

    def fail(self, req: Request, err: int = _errno.EIO) -> None:
        self.complete(req, -abs(err))

    def forward(self, req: Request, host_offset: int) -> None:
        """Owner thread, queues with ``forward_fd`` only: serve READ/WRITE ``req`` by IO on the
        forward file at ``host_offset`` (``req.length`` bytes; FUA writes with RWF_DSYNC).  The core
        does the IO and commits ``req`` itself; :meth:`wait` later reports it to ``on_forwarded``.
        Forwards are batched: the next :meth:`wait` hands them to the core in one call."""
        self._fwd_tags.append(req.tag)
        self._fwd_hosts.append(host_offset)

    def _flush_forwards(self) -> None:
        tags, hosts = self._fwd_tags, self._fwd_hosts
        ret = lib.ubq_forward(self._q, ffi.from_buffer("uint16_t[]", tags), ffi.from_buffer("uint64_t[]", hosts),
                              len(tags))
        if ret < 0:
            # Nothing was started (the core checks every entry first): fail the requests here and
            # still report them, so whoever pinned their host ranges releases them.
            failed = [Forwarded(t, -1, h, ret) for t, h in zip(tags, hosts)]
            self._done_tags.extend(tags)
            self._done_res.extend([ret] * len(tags))
        del tags[:]
        del hosts[:]
        if ret < 0 and self._on_forwarded is not None:
            self._on_forwarded(failed)

    # ---- data
    def read_data(self, req: Request, buf, offset: int = 0) -> int:
        """Copy the payload of a WRITE (from ``offset`` within the request) into ``buf``, a
        writable buffer of the backend's choosing; returns the byte count."""
        n = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
        ret = lib.ubq_copy_from_req(self._q, req.tag, ffi.from_buffer(buf, require_writable=True), n, offset)
        if ret < 0:
            raise OSError(-ret, f"reading data of tag {req.tag} (queue {self.q_id})")
        return ret

    def write_data(self, req: Request, data, offset: int = 0) -> int:
        """Copy ``data`` into a READ request at ``offset``; returns the byte count."""
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        ret = lib.ubq_copy_to_req(self._q, req.tag, ffi.from_buffer(data), n, offset)
        if ret < 0:
            raise OSError(-ret, f"writing data of tag {req.tag} (queue {self.q_id})")
        return ret

    def buffer(self, req: Request) -> memoryview | None:
        """Buffer mode: the request's data buffer, zero-copy (None in user-copy mode)."""
        ptr = lib.ubq_tag_buffer(self._q, req.tag)
        if ptr == ffi.NULL:
            return None
        return memoryview(ffi.buffer(ptr, req.length))

    @property
    def user_copy(self) -> bool:
        return bool(lib.ubq_user_copy(self._q))

    # ---- bookkeeping
    def stats(self) -> dict:
        st = ffi.new("struct ubq_stats *")
        lib.ubq_get_stats(self._q, st)
        return {
            "ops": {OP_NAMES[i]: st.ops[i] for i in range(lib.UBQ_NR_OPS)},
            "bytes": {OP_NAMES[i]: st.bytes[i] for i in range(lib.UBQ_NR_OPS)},
            "errors": st.errors, "in_flight": st.in_flight, "bad_completions": st.bad_completions,
            "kernel_errors": st.kernel_errors, "last_kernel_error": st.last_kernel_error,
            "aborted": st.aborted, "latency_us_log2": list(st.lat_us),
            "forwarded": st.forwarded, "forward_errors": st.forward_errors,
            "signals": st.signals, "waits": st.waits, "batches": st.batches,
        }

    def serve_forever(self, handle, timeout: float = 1.0) -> None:
        """Convenience loop: ``handle(queue, requests)`` for every batch until the queue stops."""
        try:
            while True:
                reqs = self.wait(timeout)
                if reqs:
                    handle(self, reqs)
        except QueueStopped:
            pass

    def close(self) -> None:
        """Tear down the ring and mappings (owner thread).  Closing a queue of a live device makes
        the kernel treat its server as gone."""
        if not self.closed:
            self.closed = True
            lib.ubq_close(self._q)
            self._q = None

    def __enter__(self) -> "Queue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
