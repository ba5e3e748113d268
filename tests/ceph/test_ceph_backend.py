"""RbdBackend against a real cluster: data round trips, queue depth 32, errors, OSD faults."""

from __future__ import annotations

import errno
import json
import os
import random
import socket
import threading
import time

import pytest

from ublk_plugins.rbd.backend import RbdBackend, RbdError

KiB, MiB = 1 << 10, 1 << 20


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


class QD:
    """Keep up to ``depth`` async ops in flight; collect (index, err, data)."""

    def __init__(self, depth: int = 32):
        self.depth = depth
        self.sem = threading.Semaphore(depth)
        self.lock = threading.Lock()
        self.results: dict[int, tuple[int, bytes | None]] = {}
        self.submitted = 0
        self.cb_threads: set[str] = set()

    def cb_for(self, i: int):
        def cb(err, data):
            with self.lock:
                self.results[i] = (err, data)
                self.cb_threads.add(threading.current_thread().name)
            self.sem.release()
        return cb

    def submit(self, fn, *args, **kw):
        if not self.sem.acquire(timeout=120):
            raise AssertionError("no completion in 120 s")
        i = self.submitted
        self.submitted += 1
        fn(*args, self.cb_for(i), **kw)
        return i

    def drain(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(self.depth):
            if not self.sem.acquire(timeout=max(0.01, deadline - time.monotonic())):
                with self.lock:
                    n = len(self.results)
                raise AssertionError(f"only {n}/{self.submitted} ops completed in {timeout}s")
        for _ in range(self.depth):
            self.sem.release()

    @property
    def outstanding(self) -> int:
        with self.lock:
            return self.submitted - len(self.results)


# ---------------------------------------------------------------- cluster ----

def test_cluster_info_and_pool(ceph_cluster):
    info = ceph_cluster.info()
    for k in ("conf", "keyring", "client", "pool"):
        assert info[k]
    assert os.path.isfile(info["conf"]) and os.path.isfile(info["keyring"])
    assert info["mon_host"].startswith("127.0.0.1:")
    r = ceph_cluster.rados()
    try:
        apps = ceph_cluster.mon_command(r, {"prefix": "osd pool application get",
                                            "pool": info["pool"], "format": "json"})
        assert "rbd" in apps
        st = ceph_cluster.osd_state(r)
        assert st["up"] == 1 and st["in"] == 1
        for a in st["public_addrs"]["addrvec"]:
            assert a["addr"].startswith("127.0.0.1:")
    finally:
        r.shutdown()


# ---------------------------------------------------------- round trips -----

def test_properties(rbd_image):
    name = rbd_image(48 * MiB)
    with rbd_image.open(name) as b:
        assert b.size == 48 * MiB
        assert b.object_size == 4 * MiB
        assert b.read_only is False
        assert b.discard_granularity == 64 * KiB
        assert b.features & 0x4  # exclusive-lock stays on (object-map friendly)


def test_roundtrip_all_operations(rbd_image):
    name = rbd_image(32 * MiB)
    with rbd_image.open(name) as b:
        s = b.sync()
        osz = b.object_size
        # fresh image reads as zeroes
        assert s.read(0, 8 * KiB) == bytes(8 * KiB)
        # aligned, unaligned, and object-crossing writes
        cases = [(0, 4 * KiB), (4 * KiB, 512), (12345, 6789), (osz - 2 * KiB, 8 * KiB),
                 (3 * osz - 100, 1 * MiB), (b.size - 4 * KiB, 4 * KiB)]
        for i, (off, n) in enumerate(cases):
            data = pattern(i, n)
            s.write(off, data)
            assert s.read(off, n) == data, (off, n)
        # FUA write and flush
        data = pattern(99, 64 * KiB)
        s.write(5 * MiB, data, fua=True)
        s.flush()
        assert s.read(5 * MiB, 64 * KiB) == data
        # write_zeroes: partial range inside an object, then a whole object
        s.write(6 * MiB, pattern(7, 256 * KiB))
        s.write_zeroes(6 * MiB + 4 * KiB, 8 * KiB)
        got = s.read(6 * MiB, 256 * KiB)
        want = pattern(7, 256 * KiB)
        assert got[:4 * KiB] == want[:4 * KiB]
        assert got[4 * KiB:12 * KiB] == bytes(8 * KiB)
        assert got[12 * KiB:] == want[12 * KiB:]
        s.write(2 * osz, pattern(8, osz))
        s.write_zeroes(2 * osz, osz)
        assert s.read(2 * osz, osz) == bytes(osz)
        # discard of a whole object deallocates it: reads back zeroes
        s.write(4 * osz, pattern(9, osz))
        s.discard(4 * osz, osz)
        assert s.read(4 * osz, osz) == bytes(osz)
        # a 4 KiB discard is accepted but advisory (below rbd_discard_granularity_bytes)
        s.write(5 * osz, pattern(10, 8 * KiB))
        s.discard(5 * osz, 4 * KiB)
        assert s.read(5 * osz + 4 * KiB, 4 * KiB) == pattern(10, 8 * KiB)[4 * KiB:]
        s.flush()


def test_aio_types_and_callback_thread(rbd_image):
    name = rbd_image(8 * MiB)
    with rbd_image.open(name) as b:
        done = threading.Event()
        seen = []

        def cb(err, data):
            seen.append((err, data, threading.current_thread() is threading.main_thread()))
            done.set()
        # bytearray and memoryview are accepted for writes
        b.aio_write(0, bytearray(b"x" * 4096), cb)
        assert done.wait(30)
        done.clear()
        b.aio_write(4096, memoryview(b"y" * 4096), cb)
        assert done.wait(30)
        done.clear()
        b.aio_read(0, 8192, cb)
        assert done.wait(30)
        assert seen[0][:2] == (0, None) and seen[1][:2] == (0, None)
        assert seen[2][0] == 0 and seen[2][1] == b"x" * 4096 + b"y" * 4096
        assert isinstance(seen[2][1], bytes)
        assert not any(m for _, _, m in seen)  # callbacks ran on librbd's thread
        # readinto a caller buffer
        buf = bytearray(8192)
        ev, res = threading.Event(), []
        b.aio_readinto(0, memoryview(buf), lambda err: (res.append(err), ev.set()))
        assert ev.wait(30) and res == [0]
        assert bytes(buf) == b"x" * 4096 + b"y" * 4096
        # an exception in a callback does not break later IO
        b.aio_flush(lambda err, data: 1 / 0)
        b.sync().flush()
        assert b.wait_idle(10)


def test_bounds_and_read_only(rbd_image, ceph_cluster):
    name = rbd_image(8 * MiB)
    with rbd_image.open(name) as b:
        s = b.sync()
        for off, n in ((8 * MiB - 10, 4096), (8 * MiB, 1), (-1, 10)):
            with pytest.raises(RbdError) as ei:
                s.read(off, n)
            assert ei.value.errno == errno.EINVAL
        s.write(0, b"snap" * 1024)
        import rbd
        b._image.create_snap("s1")
        s.write(0, b"head" * 1024)
    with rbd_image.open(name, snapshot="s1") as snap:
        assert snap.read_only
        assert snap.sync().read(0, 4096) == b"snap" * 1024
        with pytest.raises(RbdError) as ei:
            snap.sync().write(0, b"z")
        assert ei.value.errno == errno.EROFS
    with rbd_image.open(name, read_only=True) as ro:
        assert ro.sync().read(0, 4096) == b"head" * 1024


# --------------------------------------------------------- queue depth 32 ---

def test_random_4k_qd32_write_then_verify(rbd_image):
    name = rbd_image(64 * MiB)
    nblocks = (64 * MiB) // 4096
    rng = random.Random(1234)
    n = 4000
    with rbd_image.open(name) as b:
        model: dict[int, bytes] = {}
        q = QD(32)
        t0 = time.monotonic()
        for k in range(n):
            blk = rng.randrange(nblocks)
            data = rng.randbytes(4096)
            # Overlapping in-flight writes to one block have no defined order: keep only
            # one write per block in flight by using a fresh block when needed.
            while blk in model:
                blk = rng.randrange(nblocks)
            model[blk] = data
            q.submit(b.aio_write, blk * 4096, data)
        q.drain()
        wt = time.monotonic() - t0
        assert all(err == 0 for err, _ in q.results.values())
        blocks = list(model)
        rng.shuffle(blocks)
        r = QD(32)
        t0 = time.monotonic()
        for blk in blocks:
            r.submit(b.aio_read, blk * 4096, 4096)
        r.drain()
        rt = time.monotonic() - t0
        for i, blk in enumerate(blocks):
            err, data = r.results[i]
            assert err == 0 and data == model[blk], f"block {blk}"
        # unwritten blocks still read as zeroes
        free = next(x for x in range(nblocks) if x not in model)
        assert b.sync().read(free * 4096, 4096) == bytes(4096)
        print(f"\nQD32 4k random: write {n / wt:.0f} IOPS, read {n / rt:.0f} IOPS")


# -------------------------------------------------------------- errors ------

def _timed_open_error(rbd_image, name, **kw):
    t0 = time.monotonic()
    with pytest.raises(RbdError) as ei:
        rbd_image.open(name, **kw)
    return ei.value, time.monotonic() - t0


def test_error_missing_pool(rbd_image, ceph_cluster):
    i = ceph_cluster.info()
    t0 = time.monotonic()
    with pytest.raises(RbdError, match="pool 'nosuchpool' does not exist") as ei:
        RbdBackend.open("nosuchpool", "x", conf=i["conf"], client=i["client"], keyring=i["keyring"])
    assert ei.value.errno == errno.ENOENT and time.monotonic() - t0 < 10


def test_error_missing_image(rbd_image):
    e, dt = _timed_open_error(rbd_image, "nosuchimage")
    assert "image 'nosuchimage' does not exist in pool 'rbd'" in str(e)
    assert e.errno == errno.ENOENT and dt < 10


def test_error_missing_snapshot_and_namespace(rbd_image):
    name = rbd_image(4 * MiB)
    e, _ = _timed_open_error(rbd_image, name, snapshot="nosnap")
    assert f"snapshot 'nosnap' of image '{name}' does not exist" in str(e)
    e, _ = _timed_open_error(rbd_image, name, namespace="nons")
    assert "namespace 'nons' does not exist in pool 'rbd'" in str(e)


def test_error_wrong_key(rbd_image, tmp_path):
    from ublk_tests_ceph_cluster import gen_key
    kr = tmp_path / "wrong.keyring"
    kr.write_text(f"[client.ublk]\n\tkey = {gen_key()}\n")
    name = rbd_image(4 * MiB)
    e, dt = _timed_open_error(rbd_image, name, keyring=str(kr))
    assert "authentication as client.ublk rejected" in str(e) and "wrong key" in str(e)
    assert e.errno == errno.EACCES and dt < 10


def test_error_unknown_client(rbd_image):
    name = rbd_image(4 * MiB)
    e, dt = _timed_open_error(rbd_image, name, client="nobody")
    assert "client.nobody" in str(e) and dt < 10


def test_error_monitors_unreachable(rbd_image, ceph_cluster, tmp_path):
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = open(ceph_cluster.conf).read().replace(
        f"mon host = [v2:{ceph_cluster.mon_addr}]", f"mon host = [v2:127.0.0.1:{port}]")
    p = tmp_path / "dead.conf"
    p.write_text(conf)
    e, dt = _timed_open_error(rbd_image, "img", conf=str(p))  # default timeout=30
    assert "unreachable" in str(e) and f"127.0.0.1:{port}" in str(e)
    assert e.errno == errno.ETIMEDOUT
    assert dt < 35, dt


@pytest.mark.parametrize("kw, msg", [
    (dict(pool=""), "pool must not be empty"),
    (dict(pool="a/b"), "must not contain"),
    (dict(image=None), "image is required"),
    (dict(image="a@b"), "must not contain"),
    (dict(namespace=3), "namespace must be a string"),
    (dict(conf="/nonexistent/ceph.conf"), "does not exist"),
    (dict(keyring="/nonexistent/keyring"), "does not exist"),
    (dict(client="osd.0"), "must be an id"),
    (dict(client="client."), "must be an id"),
    (dict(timeout=0), "timeout must be"),
    (dict(timeout="30"), "timeout must be"),
    (dict(io_timeout=-1), "io_timeout must be"),
    (dict(options={"x": 1}), "options must be"),
])
def test_bad_options_rejected_locally(kw, msg):
    # Checked before any contact with a cluster: no cluster fixture here.
    args = dict(pool="rbd", image="img", conf=None, client="admin", keyring=None)
    args.update(kw)
    pool, image = args.pop("pool"), args.pop("image")
    t0 = time.monotonic()
    with pytest.raises(RbdError, match=msg):
        RbdBackend.open(pool, image, **args)
    assert time.monotonic() - t0 < 1


def test_error_bad_config_option(rbd_image):
    e, dt = _timed_open_error(rbd_image, "img", options={"no_such_option": "1"})
    assert "bad Ceph option" in str(e) and e.errno == errno.EINVAL and dt < 1


def test_error_unparsable_config(rbd_image, tmp_path):
    p = tmp_path / "broken.conf"
    p.write_text("[global\nmon host = \x00\n")
    e, dt = _timed_open_error(rbd_image, "img", conf=str(p))
    assert "broken.conf" in str(e) and dt < 1


def test_mon_host_from_options_without_conf(rbd_image, ceph_cluster):
    name = rbd_image(4 * MiB)
    i = ceph_cluster.info()
    with RbdBackend.open(i["pool"], name, client=i["client"], keyring=i["keyring"],
                         options={"mon_host": f"[v2:{i['mon_host']}]"}) as b:
        b.sync().write(0, b"m" * 512)
        assert b.sync().read(0, 512) == b"m" * 512


def test_open_bounded_while_osd_down(rbd_image, ceph_cluster):
    name = rbd_image(4 * MiB)
    ceph_cluster.stop_osd()
    try:
        e, dt = _timed_open_error(rbd_image, name, timeout=3)
        assert e.errno == errno.ETIMEDOUT and "OSDs did not answer" in str(e)
        assert dt < 10
    finally:
        ceph_cluster.start_osd()


# ----------------------------------------------------------- OSD faults -----

def _fault_workload(clu, factory_open, name, stop_mode):
    """QD32 of distinct 4k writes (+ reads of pre-written blocks); the OSD goes away
    with IO outstanding and comes back; everything must complete, correctly."""
    nblocks = 2048
    rng = random.Random(77)
    base = {blk: pattern(blk, 4096) for blk in range(0, nblocks, 2)}  # even blocks
    with factory_open(name) as b:
        s = b.sync()
        for blk in range(0, nblocks, 64):
            s.write(blk * 4096, b"".join(base.get(x, bytes(4096)) for x in range(blk, blk + 64)))
        s.flush()
        odd = list(range(1, nblocks, 2))
        rng.shuffle(odd)
        model = {}
        q = QD(32)
        reads = {}
        stopped_with = None
        t_stop = t_start = None
        for k, blk in enumerate(odd):
            if k == 300:
                t_stop = time.monotonic()
                clu.stop_osd(stop_mode)
                stopped_with = q.outstanding  # submitted before the stop, not yet done
                # IO submitted now must wait, not fail. Plain writes may complete at once
                # when librbd's write-around cache is on (they are acked before the OSD
                # has them); FUA writes, flushes and reads must wait for the OSD.
                hold = QD(64)
                must_wait = set()
                for j in range(24):
                    hb = odd[-1 - j]
                    data = pattern(10**6 + hb, 4096)
                    model[hb] = data
                    i = hold.submit(b.aio_write, hb * 4096, data, fua=(j % 2 == 0))
                    if j % 2 == 0 or not b.write_cache:
                        must_wait.add(i)
                must_wait.add(hold.submit(b.aio_flush))
                hold_reads = {}
                for j in range(8):
                    rb = 2 * j * 97 % nblocks
                    i = hold.submit(b.aio_read, rb * 4096, 4096)
                    hold_reads[i] = rb
                    must_wait.add(i)
                try:
                    time.sleep(1.0)
                    with hold.lock:
                        done_early = must_wait & set(hold.results)
                    assert not done_early, \
                        f"IO completed while the only OSD was down: {sorted(done_early)}"
                finally:
                    t_start = time.monotonic()
                    clu.start_osd()
                hold.drain(60)
                assert all(err == 0 for err, _ in hold.results.values())
                for i, rb in hold_reads.items():
                    assert hold.results[i][1] == base[rb]
            if blk in model:
                continue
            data = pattern(blk, 4096)
            model[blk] = data
            q.submit(b.aio_write, blk * 4096, data)
            rb = rng.randrange(0, nblocks, 2)
            reads[q.submit(b.aio_read, rb * 4096, 4096)] = rb
        q.drain(60)
        assert all(err == 0 for err, _ in q.results.values())
        for i, rb in reads.items():
            assert q.results[i][1] == base[rb]
        s.flush()
        model.update(base)
        got = s.read(0, nblocks * 4096)
        for blk in range(nblocks):
            assert got[blk * 4096:(blk + 1) * 4096] == model.get(blk, bytes(4096)), blk
        return stopped_with, time.monotonic() - t_start if t_start else None


@pytest.mark.parametrize("cache", ["writearound", "nocache"])
def test_osd_restart_memstore_sigterm(rbd_image, ceph_cluster, cache):
    """Memstore keeps data only through a clean shutdown (SIGTERM with
    osd_fast_shutdown=false), which also tells the monitor the OSD is gone."""
    name = rbd_image(16 * MiB)
    opts = {"rbd_cache": "false"} if cache == "nocache" else {}
    _fault_workload(ceph_cluster, lambda n: rbd_image.open(n, options=opts), name, "term")


def test_osd_crash_restart_bluestore_sigkill(bluestore_rbd_image, bluestore_cluster):
    """A real crash: SIGKILL of a bluestore-on-a-file OSD, then restart."""
    name = bluestore_rbd_image(16 * MiB)
    _fault_workload(bluestore_cluster, bluestore_rbd_image.open, name, "kill")


# ------------------------------------------- namespaces, exclusive lock ----

def test_namespace_roundtrip(ceph_cluster, rbd_image):
    import rbd
    r = ceph_cluster.rados()
    try:
        ioctx = r.open_ioctx(ceph_cluster.pool)
        if not rbd.RBD().namespace_exists(ioctx, "tenant1"):
            rbd.RBD().namespace_create(ioctx, "tenant1")
        ioctx.set_namespace("tenant1")
        rbd.RBD().create(ioctx, "nsimg", 8 * MiB, old_format=False)
        ioctx.close()
    finally:
        r.shutdown()
    with rbd_image.open("nsimg", namespace="tenant1") as b:
        assert b.spec == "rbd/tenant1/nsimg"
        b.sync().write(4096, b"n" * 4096)
        assert b.sync().read(4096, 4096) == b"n" * 4096
    # the same name outside the namespace does not exist
    with pytest.raises(RbdError, match="image 'nsimg' does not exist in pool 'rbd'"):
        rbd_image.open("nsimg")


def test_two_clients_exclusive_lock_handoff(rbd_image):
    """Two writers on one image: librbd passes the exclusive lock back and forth; the
    object map stays valid (nothing in the backend disables or breaks it)."""
    import rbd
    name = rbd_image(16 * MiB)
    a = rbd_image.open(name)
    b = rbd_image.open(name)
    try:
        sa, sb = a.sync(), b.sync()
        for i in range(6):
            w, s = (a, sa) if i % 2 == 0 else (b, sb)
            s.write(i * MiB, pattern(i, 64 * KiB))
            s.flush()
            assert w._image.is_exclusive_lock_owner()
        for i in range(6):
            assert sa.read(i * MiB, 64 * KiB) == pattern(i, 64 * KiB)
            assert sb.read(i * MiB, 64 * KiB) == pattern(i, 64 * KiB)
        for x in (a, b):
            assert x.features & rbd.RBD_FEATURE_OBJECT_MAP
            assert x._image.flags() & rbd.RBD_FLAG_OBJECT_MAP_INVALID == 0
    finally:
        a.close()
        b.close()


def test_error_no_caps_for_pool(ceph_cluster, rbd_image):
    """client.ublk's caps cover pool 'rbd' only: another pool's image is refused clearly."""
    import rbd
    r = ceph_cluster.rados()
    try:
        if not r.pool_exists("other"):
            ceph_cluster.mon_command(r, {"prefix": "osd pool create", "pool": "other",
                                         "pg_num": 8, "pgp_num": 8})
            ceph_cluster.mon_command(r, {"prefix": "osd pool application enable",
                                         "pool": "other", "app": "rbd"})
        ioctx = r.open_ioctx("other")
        rbd.RBD().create(ioctx, "locked", 4 * MiB, old_format=False)
        ioctx.close()
    finally:
        r.shutdown()
    i = ceph_cluster.info()
    t0 = time.monotonic()
    with pytest.raises(RbdError) as ei:
        RbdBackend.open("other", "locked", conf=i["conf"], client=i["client"],
                        keyring=i["keyring"], timeout=10)
    print(f"\n{ei.value} (errno {ei.value.errno})")
    assert ei.value.errno in (errno.EPERM, errno.EACCES)
    assert "caps" in str(ei.value) and time.monotonic() - t0 < 15
    # the admin client may open it
    with RbdBackend.open("other", "locked", conf=i["conf"], client="admin",
                         keyring=i["admin_keyring"]) as b:
        assert b.size == 4 * MiB


def test_osd_paused_then_resumed(rbd_image, ceph_cluster):
    """SIGSTOP: the OSD is unresponsive but its connections stay; IO waits, then completes."""
    name = rbd_image(8 * MiB)
    with rbd_image.open(name) as b:
        s = b.sync()
        base = pattern(5, 1 * MiB)
        s.write(0, base)
        s.flush()
        q = QD(32)
        ceph_cluster.pause_osd()
        try:
            reads = {q.submit(b.aio_read, k * 4096, 4096): k for k in range(0, 256, 16)}
            fua = q.submit(b.aio_write, 2 * MiB, pattern(6, 4096), fua=True)
            time.sleep(1.0)
            with q.lock:
                # reads may be answered from librbd's cache; a FUA write must reach the OSD
                assert fua not in q.results, "a FUA write completed while the OSD was stopped"
        finally:
            ceph_cluster.resume_osd()
        q.drain(60)
        assert all(err == 0 for err, _ in q.results.values())
        for i, k in reads.items():
            assert q.results[i][1] == base[k * 4096:(k + 1) * 4096]
        assert q.results[fua][0] == 0
        assert s.read(2 * MiB, 4096) == pattern(6, 4096)


def test_io_timeout_reports_etimedout(rbd_image, ceph_cluster):
    """With io_timeout > 0 an IO to an unresponsive OSD fails with ETIMEDOUT in bounded time
    (the default, 0, waits for the cluster instead)."""
    name = rbd_image(4 * MiB)
    with rbd_image.open(name, io_timeout=2) as b:
        b.sync().write(0, b"t" * 4096)
        b.sync().flush()
        ceph_cluster.pause_osd()
        try:
            t0 = time.monotonic()
            with pytest.raises(RbdError) as ei:
                # a range never written: librbd's cache cannot answer it, the OSD must
                b.sync(timeout=20).read(2 * MiB, 4096)
            dt = time.monotonic() - t0
        finally:
            ceph_cluster.resume_osd()
        assert ei.value.errno == errno.ETIMEDOUT and 1.5 < dt < 10, (ei.value, dt)
        assert b.sync().read(0, 4096) == b"t" * 4096
