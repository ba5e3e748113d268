"""The rbd handler's native data path (plugins/rbd/rbdio.c) against a real cluster, without the
kernel: a fake queue stands in for the core (its complete/copy functions are C callbacks into
Python), requests go in as the core's ``struct ubq_req`` array exactly as the runner passes them,
and the data is checked through the Python binding's own connection."""

from __future__ import annotations

import errno
import random
import threading
import time

import pytest

from runner.core import ffi as core_ffi
from ublk_plugins.rbd import native

from runner.handler import DeviceSpec, validate_options
from ublk_plugins.rbd.handler import RbdHandler

pytestmark = pytest.mark.skipif(native.available() is not None,
                                reason=f"native rbd path unavailable: {native.available()}")

KiB, MiB = 1 << 10, 1 << 20
READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = 0, 1, 2, 3, 5
F_FUA, F_NOUNMAP = 1 << 13, 1 << 15


class FakeQueue:
    """What the core offers native code: ubq_complete and the two copies, as callbacks; the
    request array of the core's own cffi type.  Write payloads come from ``payload[tag]``;
    read data lands in ``data[tag]``; results in ``results[tag]`` (a tag completes once)."""

    def __init__(self, depth=64):
        self.depth = depth
        self.raw_requests = core_ffi.new("struct ubq_req[]", depth)
        self.payload: dict[int, bytes] = {}
        self.data: dict[int, bytes] = {}
        self.results: dict[int, int] = {}
        self.bad = []
        self.cv = threading.Condition()
        self.threads = set()
        f = native.ffi
        self._cbs = [
            f.callback("int(void *, uint16_t, int32_t)", self._complete),
            f.callback("ssize_t(void *, uint16_t, void *, size_t, size_t)", self._copy_to),
            f.callback("ssize_t(void *, uint16_t, void *, size_t, size_t)", self._copy_from),
        ]

    def native_api(self):
        a = [int(native.ffi.cast("uintptr_t", c)) for c in self._cbs]
        return {"queue": 0x1000, "complete": a[0], "copy_to_req": a[1], "copy_from_req": a[2],
                "depth": self.depth}

    def _complete(self, q, tag, result):
        with self.cv:
            if tag in self.results:
                self.bad.append(tag)
            self.results[tag] = result
            self.threads.add(threading.current_thread().name)
            self.cv.notify_all()
        return 0

    def _copy_to(self, q, tag, src, n, off):
        self.data[tag] = bytes(native.ffi.buffer(src, n))
        return n

    def _copy_from(self, q, tag, dst, n, off):
        p = self.payload[tag]
        native.ffi.buffer(dst, n)[:] = p[off:off + n]
        return n

    def put(self, reqs):
        """reqs: [(op_flags, offset, length, payload|None)] -> tags 0..n-1 in raw_requests."""
        for tag, (opf, off, n, payload) in enumerate(reqs):
            r = self.raw_requests[tag]
            r.offset, r.length, r.op_flags, r.tag = off, n, opf, tag
            self.results.pop(tag, None)
            if payload is not None:
                self.payload[tag] = payload
        return len(reqs)

    def wait(self, tags, timeout=60):
        with self.cv:
            assert self.cv.wait_for(lambda: all(t in self.results for t in tags), timeout), \
                f"tags {[t for t in tags if t not in self.results]} never completed"
        return [self.results[t] for t in tags]


def open_handler(cluster, image, **kw) -> RbdHandler:
    i = cluster.info()
    raw = dict(pool=i["pool"], image=image, conf=i["conf"], client=i["client_id"],
               keyring=i["keyring"], **kw)
    opts, errors = validate_options(RbdHandler.options_schema, raw)
    assert not errors, errors
    return RbdHandler.open(opts, DeviceSpec(name="r"))


def attach(h, q):
    sub = h.attach_queue(q)
    assert sub is not None, "the native path did not attach"
    return sub


def test_native_write_read_flush_zeroes_discard(ceph_cluster, rbd_image):
    name = rbd_image(8 * MiB)
    h = open_handler(ceph_cluster, name, ceph_options=["rbd_cache=false"])
    q = FakeQueue(64)
    sub = attach(h, q)
    try:
        rng = random.Random(5)
        offs = rng.sample(range(0, 8 * MiB, 4 * KiB), 48)
        pats = {o: rng.randbytes(4 * KiB) for o in offs}
        # 48 writes at once (one batch, like one wait() of the runner), some FUA, then a flush
        n = q.put([(WRITE | (F_FUA if i % 5 == 0 else 0), o, 4 * KiB, pats[o])
                   for i, o in enumerate(offs)])
        sub.submit(q.raw_requests, n)
        assert q.wait(range(n)) == [4 * KiB] * n
        assert not q.bad and q.threads and threading.main_thread().name not in q.threads
        sub.submit(q.raw_requests, q.put([(FLUSH, 0, 0, None)]))
        assert q.wait([0]) == [0]
        # read back natively ...
        n = q.put([(READ, o, 4 * KiB, None) for o in offs])
        sub.submit(q.raw_requests, n)
        assert q.wait(range(n)) == [4 * KiB] * n
        assert all(q.data[t] == pats[o] for t, o in enumerate(offs))
        # ... and through the Python binding's connection: the same image
        b = h.backend.sync()
        for o in offs[:8]:
            assert b.read(o, 4 * KiB) == pats[o]
        # an 8 KiB read across two written blocks is one request
        o = offs[0]
        n = q.put([(READ, o, 8 * KiB, None)])
        sub.submit(q.raw_requests, n)
        assert q.wait([0]) == [8 * KiB] and q.data[0][:4 * KiB] == pats[o]
        # write_zeroes, both flavours, and an advisory discard
        z = sorted(offs)[:2]
        n = q.put([(WRITE_ZEROES, z[0], 4 * KiB, None),
                   (WRITE_ZEROES | F_NOUNMAP, z[1], 4 * KiB, None),
                   (DISCARD, 4 * MiB, 64 * KiB, None)])
        sub.submit(q.raw_requests, n)
        assert q.wait(range(n)) == [0, 0, 0]
        assert b.read(z[0], 4 * KiB) == bytes(4 * KiB) == b.read(z[1], 4 * KiB)
        st = h.native_stats()
        assert st["errors"] == 0 and st["inflight"] == 0
    finally:
        sub.detach()
        h.close()


def test_native_errors_complete_the_request(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    h = open_handler(ceph_cluster, name)
    q = FakeQueue(8)
    sub = attach(h, q)
    try:
        # past the end of the image (the kernel never sends this: the device is not larger);
        # an unknown op (WRITE_SAME=4)
        n = q.put([(READ, 4 * MiB - 4 * KiB, 8 * KiB, None), (4, 0, 4 * KiB, None),
                   (WRITE, 4 * MiB, 4 * KiB, b"x" * 4096)])
        sub.submit(q.raw_requests, n)
        res = q.wait(range(n))
        assert all(r < 0 for r in res), res
        assert res[1] == -errno.EOPNOTSUPP
        assert h.native_stats()["errors"] == 3
        # and the queue keeps working
        n = q.put([(WRITE, 0, 4 * KiB, b"k" * 4096)])
        sub.submit(q.raw_requests, n)
        assert q.wait([0]) == [4 * KiB]
    finally:
        sub.detach()
        h.close()


def test_native_io_timeout_fails_with_eio_then_recovers(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    h = open_handler(ceph_cluster, name, io_timeout=2)
    q = FakeQueue(16)
    sub = attach(h, q)
    try:
        n = q.put([(WRITE | F_FUA, 0, 4 * KiB, b"t" * 4096)])
        sub.submit(q.raw_requests, n)
        assert q.wait([0]) == [4 * KiB]
        ceph_cluster.pause_osd()
        try:
            t0 = time.monotonic()
            n = q.put([(READ, 0, 4 * KiB, None), (WRITE | F_FUA, 8192, 4 * KiB, b"w" * 4096),
                       (FLUSH, 0, 0, None)])
            sub.submit(q.raw_requests, n)
            res = q.wait(range(n), timeout=30)
            dt = time.monotonic() - t0
        finally:
            ceph_cluster.resume_osd()
        assert res[:2] == [-errno.EIO, -errno.EIO], res
        assert dt < 15, dt
        assert h.native_stats()["errors"] >= 2
        # the cluster is back: the tags are reused while late completions may still arrive
        n = q.put([(READ, 0, 4 * KiB, None), (WRITE | F_FUA, 4096, 4 * KiB, b"v" * 4096)])
        sub.submit(q.raw_requests, n)
        assert q.wait(range(n), timeout=60) == [4 * KiB] * 2
        assert q.data[0] == b"t" * 4096
        assert not q.bad
    finally:
        sub.detach()
        h.close()


def test_native_false_keeps_the_python_path(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    h = open_handler(ceph_cluster, name, native=False)
    try:
        assert h.attach_queue(FakeQueue(4)) is None
    finally:
        h.close()
