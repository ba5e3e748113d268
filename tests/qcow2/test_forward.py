"""The engine side of the qcow2 fast path: map_forward() resolves a request to a host range
(pinned) and unpin_forward() releases it; frees of pinned clusters are deferred, never waited for.
The IO a forwarded request does in the native core is simulated here with pread/pwrite on the
image fd, issued late (while other operations run) the way an in-flight IO would land."""
import os
import random

import pytest

from qcow2_helpers import check_rc, compare_raw, qemu_img, qemu_io
from ublk_plugins.qcow2 import Qcow2Error, Qcow2Image, create

CS = 65536


@pytest.fixture
def mixed(tmp_path):
    """Clusters: 0 data, 1 zero, 2 compressed, 3 unallocated, 4 data."""
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 0x11 0 64k", "write -z 64k 64k", "write -c -P 0x33 128k 64k",
            "write -P 0x44 256k 64k")
    return img


def test_reads_forward_only_data_clusters(mixed):
    with Qcow2Image.open(mixed) as q:
        fd = q.fileno()
        host = q.map_forward(4096, 8192)
        assert host is not None and host % 4096 == 0
        assert os.pread(fd, 8192, host) == b"\x11" * 8192
        h4 = q.map_forward(4 * CS, CS)
        assert os.pread(fd, CS, h4) == b"\x44" * CS
        for off in (CS, 2 * CS, 3 * CS):                 # zero, compressed, unallocated
            assert q.map_forward(off, 4096) is None
        assert q.map_forward(CS - 4096, 8192) is None   # spans two clusters
        assert q.forwards_pinned() == 2
        q.unpin_forward([host, h4])
        assert q.forwards_pinned() == 0
        with pytest.raises(Qcow2Error):
            q.map_forward(1 << 20, 4096)                # past the end


def test_writes_forward_only_exclusive_clusters(mixed, tmp_path):
    with Qcow2Image.open(mixed) as q:
        host = q.map_forward(0, 4096, write=True)
        assert host is not None
        os.pwrite(q.fileno(), b"\xaa" * 4096, host)
        q.unpin_forward([host])
        for off in (CS, 2 * CS, 3 * CS):                 # zero, compressed, unallocated: COW/alloc in Python
            assert q.map_forward(off, 4096, write=True) is None
        q.write(3 * CS, b"\x55" * 4096)                  # allocates: pointer pending until a commit
        assert q.map_forward(3 * CS, 4096, write=True, fua=False) is not None
        assert q.map_forward(3 * CS, 4096, write=True, fua=True) is None   # FUA needs durable metadata
        q.flush()
        h3 = q.map_forward(3 * CS, 4096, write=True, fua=True)
        assert h3 is not None
        q.unpin_forward([h3, h3])
        assert q.read(0, 4096) == b"\xaa" * 4096
    assert check_rc(mixed)[0] == 0


def test_readonly_image_refuses_forwarded_writes(mixed):
    with Qcow2Image.open(mixed, readonly=True) as q:
        assert q.map_forward(0, 4096) is not None
        with pytest.raises(Qcow2Error):
            q.map_forward(0, 4096, write=True)


def test_backing_clusters_are_not_forwarded(tmp_path):
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_io(base, "write -P 0x77 0 128k")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    with Qcow2Image.open(top) as q:
        assert q.map_forward(0, 4096) is None
        assert q.map_forward(0, 4096, write=True) is None
        q.write(0, b"\x01" * 4096)                      # COW from the backing file
        h = q.map_forward(CS - 4096, 4096)
        assert os.pread(q.fileno(), 4096, h) == b"\x77" * 4096
        q.unpin_forward([h])
    assert check_rc(top)[0] == 0


def test_free_of_a_pinned_cluster_waits_for_the_unpin(mixed):
    with Qcow2Image.open(mixed) as q:
        host = q.map_forward(0, 4096)                   # a forwarded read is in flight
        idx = host // CS
        q.discard(0, CS)
        q.flush()                                        # the free would happen here
        assert q._refcount(idx) == 1                     # ...but is deferred
        for k in range(8):                               # allocations must not reuse it
            q.write((5 + k) * CS, bytes([k + 1]) * CS)
            q.flush()
            assert q.map_range((5 + k) * CS, CS)[0][3] != host
        assert os.pread(q.fileno(), 4096, host) == b"\x11" * 4096   # the read still sees its data
        q.unpin_forward([host])
        assert q._refcount(idx) == 0
        assert q.read(0, CS) == bytes(CS)
    assert check_rc(mixed)[0] == 0


def test_close_finishes_deferred_frees(mixed):
    q = Qcow2Image.open(mixed)
    q.map_forward(4 * CS, CS)
    q.discard(4 * CS, CS)
    q.close()                                            # pin never released: no IO can be left
    assert check_rc(mixed) == (0, check_rc(mixed)[1])    # 0, not 3 (leak)


@pytest.mark.parametrize("seed", range(6))
def test_random_ops_with_late_forwarded_io(tmp_path, seed):
    """Random writes/discards/zeroes through the engine mixed with forwarded reads and writes
    whose IO lands several operations later.  Clusters an in-flight forwarded write overlapped
    with a discard or another write are ambiguous (either outcome is allowed) and skipped; every
    other byte must match the reference, and qemu-img check must find no leak or corruption."""
    rnd = random.Random(seed)
    cs = 4096 if seed % 2 else CS
    size = 48 * cs
    img = tmp_path / "r.qcow2"
    create(img, size, cluster_size=cs)
    ref = bytearray(size)
    ambiguous = set()
    inflight = []          # (kind, host, goff, data_or_len, expected_or_None, touched)
    forwarded = 0
    with Qcow2Image.open(img, cache_bytes=8 * cs) as q:
        fd = q.fileno()

        def land(item):
            kind, host, goff, payload, expect, touched = item
            if kind == "w":
                os.pwrite(fd, payload, host)
            else:
                got = os.pread(fd, payload, host)
                if not touched[0]:
                    assert got == expect, f"forwarded read at {goff} saw other data"
            q.unpin_forward([host])

        def touch(off, ln):
            for it in inflight:
                if it[2] < off + ln and off < it[2] + (len(it[3]) if it[0] == "w" else it[3]):
                    it[5][0] = True
                    if it[0] == "w":
                        ambiguous.add(it[2] // cs)

        def pending_write(off, ln):
            return any(it[0] == "w" and it[2] < off + ln and off < it[2] + len(it[3]) for it in inflight)

        for _ in range(400):
            r = rnd.random()
            gcl = rnd.randrange(size // cs)
            intra = rnd.randrange(0, cs, 512)
            ln = rnd.randrange(512, cs - intra + 1, 512)
            off = gcl * cs + intra
            if r < 0.35:
                data = rnd.randbytes(ln)
                host = q.map_forward(off, ln, write=True, fua=rnd.random() < 0.1)
                touch(off, ln)
                if host is None:
                    q.write(off, data)
                else:
                    forwarded += 1
                    inflight.append(("w", host, off, data, None, [False]))
                ref[off:off + ln] = data
            elif r < 0.6:
                host = q.map_forward(off, ln)
                unsure = gcl in ambiguous or pending_write(off, ln)   # racing a write: either is fine
                if host is None:
                    assert q.read(off, ln) == bytes(ref[off:off + ln]) or unsure
                else:
                    forwarded += 1
                    inflight.append(("r", host, off, ln, bytes(ref[off:off + ln]), [unsure]))
            elif r < 0.75:
                n = rnd.randrange(1, 4) * cs
                off = gcl * cs
                n = min(n, size - off)
                touch(off, n)
                q.discard(off, n)
                ref[off:off + n] = bytes(n)
                if rnd.random() < 0.5:
                    q.flush()           # commit the free now, while IO may still be in flight
            elif r < 0.85:
                n = min(rnd.randrange(1, 3) * cs, size - gcl * cs)
                touch(gcl * cs, n)
                q.write_zeroes(gcl * cs, n, unmap=rnd.random() < 0.5)
                ref[gcl * cs:gcl * cs + n] = bytes(n)
            elif r < 0.9:
                q.flush()
            # complete some in-flight IO, in random order
            while inflight and rnd.random() < 0.3:
                land(inflight.pop(rnd.randrange(len(inflight))))
        while inflight:
            land(inflight.pop())
        assert q.forwards_pinned() == 0
        got = q.read(0, size)
    assert forwarded > 50
    rc, out = check_rc(img)
    assert rc == 0, out
    for c in range(size // cs):
        if c not in ambiguous:
            assert got[c * cs:(c + 1) * cs] == ref[c * cs:(c + 1) * cs], f"cluster {c} differs"
    raw = tmp_path / "r.raw"
    qemu_img("convert", "-O", "raw", img, raw)
    assert raw.read_bytes() == got
    # and qemu agrees with the reference outside the ambiguous clusters
    if not ambiguous:
        assert compare_raw(img, tmp_path / "r.raw")[0] == 0


def test_handler_forwards_and_releases(mixed):
    from runner.handler import DeviceSpec, validate_options
    from runner.queue import OP_READ, OP_WRITE, Forwarded, _split_forwarded, Request
    from ublk_plugins.qcow2.handler import Qcow2Handler
    opts, errs = validate_options(Qcow2Handler.options_schema, {"path": str(mixed)})
    assert not errs and opts["forward"] is True
    h = Qcow2Handler.open(opts, DeviceSpec("q"))
    try:
        assert h.forward_fd == h.img.fileno()
        host = h.forward(OP_READ, 0, 4096, False)
        wh = h.forward(OP_WRITE, 4 * CS, 4096, False)
        assert host is not None and wh is not None
        assert h.forward(OP_READ, CS, 4096, False) is None          # zero cluster: Python path
        assert h.img.forwards_pinned() == 2
        # what Queue.wait hands to on_forwarded: results are signed
        reqs, done = _split_forwarded([Request(host, 4096, OP_READ | (1 << 31), 3),
                                       Request(wh, (1 << 32) - 5, OP_WRITE | (1 << 31), 4),
                                       Request(0, 4096, OP_READ, 5)])
        assert reqs == [Request(0, 4096, OP_READ, 5)]
        assert done == [Forwarded(3, OP_READ, host, 4096), Forwarded(4, OP_WRITE, wh, -5)]
        h.forwarded(done)
        assert h.img.forwards_pinned() == 0
    finally:
        h.close()
    opts["forward"] = False
    h = Qcow2Handler.open(opts, DeviceSpec("q"))
    assert h.forward_fd is None
    h.close()
