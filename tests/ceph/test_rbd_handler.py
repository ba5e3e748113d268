"""The ``rbd`` handler class (ublk_plugins.rbd.handler.RbdHandler) against a real cluster,
without the kernel: open/close and geometry, every operation through the handler API at
queue depth 32 completed from librbd's threads, option errors, the io_timeout deadline."""

from __future__ import annotations

import errno
import mmap
import random
import socket
import threading
import time

import pytest

from runner.handler import DeviceSpec, check_handler_class, check_instance, validate_options
from ublk_plugins.rbd.handler import RbdHandler, RbdOp

KiB, MiB = 1 << 10, 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def spec(**kw) -> DeviceSpec:
    kw.setdefault("name", "r")
    return DeviceSpec(**kw)


def options(cluster, image, **kw):
    i = cluster.info()
    raw = dict(pool=i["pool"], image=image, conf=i["conf"], client=i["client_id"],
               keyring=i["keyring"])
    raw.update(kw)
    raw = {k: v for k, v in raw.items() if v is not None}
    out, errors = validate_options(RbdHandler.options_schema, raw)
    assert not errors, errors
    return out


def open_handler(cluster, image, dev=None, **kw) -> RbdHandler:
    dev = dev or spec()
    o = options(cluster, image, **kw)
    RbdHandler.check_config(o, dev)
    return RbdHandler.open(o, dev)


class Depth:
    """Keep up to ``depth`` handler futures in flight; record (index -> exception|None) and
    the threads that resolved them."""

    def __init__(self, depth=32):
        self.sem = threading.Semaphore(depth)
        self.depth = depth
        self.lock = threading.Lock()
        self.results: dict[int, BaseException | None] = {}
        self.threads: set[str] = set()
        self.n = 0
        self.max_inflight = 0

    def submit(self, fut_fn):
        assert self.sem.acquire(timeout=120), "no completion in 120 s"
        i = self.n
        self.n += 1
        fut = fut_fn()
        assert hasattr(fut, "add_done_callback")
        with self.lock:
            self.max_inflight = max(self.max_inflight, self.n - len(self.results))

        def done(f, i=i):
            try:
                f.result()
                e = None
            except BaseException as ex:  # noqa: BLE001
                e = ex
            with self.lock:
                self.results[i] = e
                self.threads.add(threading.current_thread().name)
            self.sem.release()
        fut.add_done_callback(done)
        return i

    def drain(self, timeout=120):
        for _ in range(self.depth):
            assert self.sem.acquire(timeout=timeout), f"{self.n - len(self.results)} ops stuck"
        for _ in range(self.depth):
            self.sem.release()
        errs = {i: e for i, e in self.results.items() if e is not None}
        assert not errs, errs


def wait(fut, timeout=60):
    ev = threading.Event()
    fut.add_done_callback(lambda f: ev.set())
    assert ev.wait(timeout), "no completion"
    fut.result()


# ----------------------------------------------------------------- contract ----

def test_class_passes_the_registry_checks():
    assert check_handler_class(RbdHandler) == []
    assert RbdHandler.thread_model == "parallel"


def test_open_close_geometry_and_caps(ceph_cluster, rbd_image):
    name = rbd_image(48 * MiB)
    h = open_handler(ceph_cluster, name)
    try:
        caps = check_instance(h, spec())
        assert caps["size"] == 48 * MiB
        assert caps["logical_block_size"] == 512 and caps["physical_block_size"] == 4096
        for c in ("can_write", "can_flush", "can_fua", "can_discard", "can_write_zeroes"):
            assert caps[c] is True, c
        assert caps["native_target"] is None
        # librbd's rbd_discard_granularity_bytes (64 KiB by default), for the runner
        assert h.discard_granularity == 64 * KiB
    finally:
        h.close()
    # 4 KiB logical blocks and a smaller-than-image size from the config
    h = open_handler(ceph_cluster, name, dev=spec(size=16 * MiB, logical_block_size=4096,
                                                  physical_block_size=4096))
    try:
        c = check_instance(h, spec(size=16 * MiB, logical_block_size=4096, physical_block_size=4096))
        assert c["size"] == 16 * MiB and c["logical_block_size"] == 4096
    finally:
        h.close()
    with pytest.raises(OSError, match="larger than image"):
        open_handler(ceph_cluster, name, dev=spec(size=64 * MiB))


def test_every_operation_at_depth_32(ceph_cluster, rbd_image):
    name = rbd_image(32 * MiB)
    h = open_handler(ceph_cluster, name)
    try:
        nblk = 2048  # 8 MiB of 4 KiB blocks
        data = {b: pattern(b, 4096) for b in range(nblk)}
        q = Depth(32)
        blocks = list(range(nblk))
        random.Random(1).shuffle(blocks)
        for k, b in enumerate(blocks):
            q.submit(lambda b=b, k=k: h.write(b * 4096, memoryview(data[b]), k % 7 == 0))
        q.drain()
        assert q.max_inflight >= 16, q.max_inflight
        # resolved by librbd's threads (a future that is already done when the callback is
        # attached runs it at once, on the submitting thread: that is allowed too)
        assert q.threads - {threading.main_thread().name}
        wait(h.flush())

        bufs = mmap.mmap(-1, nblk * 4096)
        mv = memoryview(bufs)
        q = Depth(32)
        for b in blocks:
            q.submit(lambda b=b: h.read(b * 4096, mv[b * 4096:(b + 1) * 4096]))
        q.drain()
        for b in range(nblk):
            assert mv[b * 4096:(b + 1) * 4096] == data[b], b

        # larger, unaligned-to-object IO
        big = pattern(99, 1 * MiB)
        wait(h.write(3 * MiB + 512, memoryview(big), True))
        out = bytearray(1 * MiB)
        wait(h.read(3 * MiB + 512, memoryview(out)))
        assert out == big

        # write_zeroes is exact (partial objects, both unmap modes); discard of whole objects
        # reads back as zeroes, a small discard is only a hint
        q = Depth(32)
        for k in range(32):
            q.submit(lambda k=k: h.write_zeroes(k * 8192, 4096, bool(k % 2)))
        q.drain()
        got = bytearray(256 * KiB)
        wait(h.read(0, memoryview(got)))
        for k in range(32):
            assert got[k * 8192:k * 8192 + 4096] == bytes(4096), k
            b = (k * 8192 + 4096) // 4096
            assert got[b * 4096:(b + 1) * 4096] == data[b], b
        q = Depth(32)
        for k in range(8):  # objects 4..7 are 16..32 MiB: make them exist, then discard
            q.submit(lambda k=k: h.write((16 + 2 * k) * MiB, memoryview(pattern(k, 4096)), False))
        q.drain()
        q = Depth(32)
        for k in range(4):
            q.submit(lambda k=k: h.discard((16 + 4 * k) * MiB, 4 * MiB))
        q.drain()
        wait(h.flush())
        got = bytearray(16 * MiB)
        wait(h.read(16 * MiB, memoryview(got)))
        assert got == bytes(16 * MiB)
        wait(h.discard(8 * MiB - 4096, 4096))  # below the granularity: accepted, no-op allowed
    finally:
        h.close()
    # a second client sees everything after close (the cache was flushed, the lock released)
    with rbd_image.open(name) as b:
        s = b.sync()
        assert s.read(0, 4096 * 4) == bytes(4096) + data[1] + bytes(4096) + data[3]
        assert s.read(3 * MiB + 512, 1 * MiB) == big


def test_errors_of_single_requests(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    h = open_handler(ceph_cluster, name)
    try:
        with pytest.raises(OSError) as ei:  # outside the image: refused at submission
            h.read(4 * MiB, memoryview(bytearray(4096)))
        assert ei.value.errno == errno.EINVAL
        # a future resolved before add_done_callback still calls back
        f = h.write(0, memoryview(b"x" * 4096), False)
        time.sleep(0.5)
        wait(f)
    finally:
        h.close()


def test_snapshot_is_read_only(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    with rbd_image.open(name) as b:
        b.sync().write(0, b"s" * 4096)
        b._image.create_snap("s1")
        b.sync().write(0, b"t" * 4096)
    h = open_handler(ceph_cluster, name, snapshot="s1")
    try:
        caps = check_instance(h, spec())
        assert caps["can_write"] is False and caps["can_write_zeroes"] is False
        buf = bytearray(4096)
        wait(h.read(0, memoryview(buf)))
        assert buf == b"s" * 4096
        with pytest.raises(OSError) as ei:
            h.write(0, memoryview(b"u" * 4096), False)
        assert ei.value.errno == errno.EROFS
    finally:
        h.close()
    h = open_handler(ceph_cluster, name, dev=spec(read_only=True))
    try:
        assert check_instance(h, spec(read_only=True))["can_write"] is False
    finally:
        h.close()


def test_namespace(ceph_cluster, rbd_image):
    import rbd
    r = ceph_cluster.rados()
    try:
        io = r.open_ioctx(ceph_cluster.pool)
        if not rbd.RBD().namespace_exists(io, "ns1"):
            rbd.RBD().namespace_create(io, "ns1")
        io.set_namespace("ns1")
        rbd.RBD().create(io, "nsimg", 4 * MiB, old_format=False)
        io.close()
    finally:
        r.shutdown()
    h = open_handler(ceph_cluster, "nsimg", namespace="ns1")
    try:
        wait(h.write(0, memoryview(b"n" * 4096), True))
        buf = bytearray(4096)
        wait(h.read(0, memoryview(buf)))
        assert buf == b"n" * 4096
    finally:
        h.close()


# ------------------------------------------------------------------ options ----

@pytest.mark.parametrize("raw, msg", [
    (dict(image="i"), "missing required option 'pool'"),
    (dict(pool="rbd"), "missing required option 'image'"),
    (dict(pool="rbd", image="i", timeout=0), "out of range"),
    (dict(pool="rbd", image="i", io_timeout=-1), "out of range"),
    (dict(pool="rbd", image="i", ceph_options="rbd_cache=false"), "expected a list"),
    (dict(pool="rbd", image="i", snapshot=True), "expected a string"),
])
def test_schema_errors(raw, msg):
    _, errors = validate_options(RbdHandler.options_schema, raw)
    assert errors and any(msg in m for _, m in errors), errors


@pytest.mark.parametrize("kw, msg", [
    (dict(pool="rbd/x"), "must not contain '/'"),
    (dict(image="a@b"), "must not contain '@'"),
    (dict(pool=""), "pool must not be empty"),
    (dict(namespace="a/b"), "must not contain"),
    (dict(snapshot=""), "snapshot must not be empty"),
    (dict(client="osd.0"), "must be an id"),
    (dict(client="a b"), "must not contain"),
    (dict(conf=""), "conf must not be empty"),
    (dict(ceph_options=["rbd_cache"]), "not KEY=VALUE"),
])
def test_check_config_errors(kw, msg):
    raw = dict(pool="rbd", image="i")
    raw.update(kw)
    o, errors = validate_options(RbdHandler.options_schema, raw)
    assert not errors
    with pytest.raises(ValueError, match=msg):
        RbdHandler.check_config(o, spec())


def _open_error(cluster, image, **kw):
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        open_handler(cluster, image, **kw)
    return ei.value, time.monotonic() - t0


def test_error_missing_pool(ceph_cluster):
    e, dt = _open_error(ceph_cluster, "x", pool="nosuchpool")
    assert "pool 'nosuchpool' does not exist" in str(e) and e.errno == errno.ENOENT and dt < 15


def test_error_missing_image(ceph_cluster):
    e, dt = _open_error(ceph_cluster, "nosuchimage")
    assert "image 'nosuchimage' does not exist" in str(e) and e.errno == errno.ENOENT and dt < 15


def test_error_missing_snapshot(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    e, _ = _open_error(ceph_cluster, name, snapshot="nosnap")
    assert "snapshot 'nosnap'" in str(e) and e.errno == errno.ENOENT


def test_error_bad_key(ceph_cluster, rbd_image, tmp_path):
    from ublk_tests_ceph_cluster import gen_key
    kr = tmp_path / "wrong.keyring"
    kr.write_text(f"[client.ublk]\n\tkey = {gen_key()}\n")
    e, dt = _open_error(ceph_cluster, rbd_image(4 * MiB), keyring=str(kr))
    assert "authentication as client.ublk rejected" in str(e) and e.errno == errno.EACCES
    assert dt < 15


def test_error_missing_keyring_and_conf_files(ceph_cluster, tmp_path):
    e, _ = _open_error(ceph_cluster, "x", keyring=str(tmp_path / "nope"))
    assert "does not exist" in str(e) and e.errno == errno.ENOENT
    e, _ = _open_error(ceph_cluster, "x", conf=str(tmp_path / "nope.conf"))
    assert "does not exist" in str(e) and e.errno == errno.ENOENT


def test_error_monitors_unreachable_bounded_by_timeout(ceph_cluster, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = open(ceph_cluster.conf).read().replace(
        f"mon host = [v2:{ceph_cluster.mon_addr}]", f"mon host = [v2:127.0.0.1:{port}]")
    p = tmp_path / "dead.conf"
    p.write_text(conf)
    e, dt = _open_error(ceph_cluster, "img", conf=str(p), timeout=3)
    assert "unreachable" in str(e) and e.errno == errno.ETIMEDOUT
    assert 2 < dt < 10, dt


# ----------------------------------------------------------------- deadline ----

def test_io_timeout_fails_with_eio_and_the_handler_keeps_working(ceph_cluster, rbd_image):
    name = rbd_image(4 * MiB)
    h = open_handler(ceph_cluster, name, io_timeout=2)
    try:
        wait(h.write(0, memoryview(b"t" * 4096), True))
        bufs = [bytearray(4096) for _ in range(8)]
        ceph_cluster.pause_osd()
        try:
            t0 = time.monotonic()
            futs = [h.read(k * 4096 * 16, memoryview(bufs[k])) for k in range(8)]
            futs.append(h.write(8192, memoryview(b"w" * 4096), True))
            futs.append(h.flush())
            errs = []
            for f in futs:
                ev = threading.Event()
                f.add_done_callback(lambda _f: ev.set())
                assert ev.wait(30), "a request outlived io_timeout by far"
                try:
                    f.result()
                except OSError as e:
                    errs.append(e.errno)
            dt = time.monotonic() - t0
        finally:
            ceph_cluster.resume_osd()
        # reads of never-written objects may be answered without the OSD (object map);
        # everything that needed the OSD failed with EIO, in bounded time
        assert errs and set(errs) == {errno.EIO}, errs
        assert len(errs) >= 2 and dt < 15, (errs, dt)
        buf = bytearray(4096)
        wait(h.read(0, memoryview(buf)))
        assert buf == b"t" * 4096
        wait(h.write(4096, memoryview(b"v" * 4096), True))
    finally:
        h.close()


def test_rbdop_resolves_once():
    op = RbdOp("read", memoryview(bytearray(4)))
    seen = []
    op.add_done_callback(lambda f: seen.append(f.exception()))
    assert op._resolve(OSError(errno.EIO, "late"))
    assert not op._resolve(None, b"abcd")  # a late completion is dropped, buffer untouched
    assert len(seen) == 1 and seen[0].errno == errno.EIO
