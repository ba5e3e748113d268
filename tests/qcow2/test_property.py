"""Hypothesis: random op sequences vs a bytearray model, then qemu-img check + compare."""
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2_helpers import check_rc, compare_raw, qemu_img, qemu_io
from ublk_plugins.qcow2 import Qcow2Image

SIZE = 1 << 20

ops = st.lists(
    st.tuples(
        st.sampled_from(["write", "write", "write", "discard", "zero", "zero_unmap", "flush",
                         "read", "native_write", "map"]),
        st.integers(0, SIZE - 1),
        st.integers(1, 40000),
        st.integers(0, 255),
    ),
    min_size=1, max_size=25)

images = st.sampled_from([
    ("3", 4096, None), ("2", 4096, None), ("3", 512, None), ("3", 65536, None),
    ("3", 4096, "raw"), ("2", 65536, "qcow2"), ("3", 65536, "snapshot"),
])


def make_image(d, spec):
    ver, cs, kind = spec
    compat = "0.10" if ver == "2" else "1.1"
    img = os.path.join(d, "p.qcow2")
    model = bytearray(SIZE)
    opts = f"compat={compat},cluster_size={cs}"
    if kind in ("raw", "qcow2"):
        base = os.path.join(d, "base." + kind)
        data = bytes((i * 7 + i // 4096) & 0xFF for i in range(SIZE - 5000))
        if kind == "raw":
            with open(base, "wb") as f:
                f.write(data)
            model[:len(data)] = data
        else:
            qemu_img("create", "-f", "qcow2", base, SIZE)
            qemu_io(base, "write -P 0x5a 0 300k", "write -P 0xa5 700k 100k")
            model[0:300 << 10] = b"\x5a" * (300 << 10)
            model[700 << 10:800 << 10] = b"\xa5" * (100 << 10)
        qemu_img("create", "-f", "qcow2", "-o", opts, "-b", os.path.basename(base), "-F", kind,
                 img, SIZE)
    else:
        qemu_img("create", "-f", "qcow2", "-o", opts, img, SIZE)
        if kind == "snapshot":
            qemu_io(img, "write -P 0x11 0 512k", "write -c -P 0x22 512k 64k")
            qemu_img("snapshot", "-c", "snap", img)
            model[0:512 << 10] = b"\x11" * (512 << 10)
            model[512 << 10:576 << 10] = b"\x22" * (64 << 10)
    return img, model


@settings(max_examples=int(os.environ.get("QCOW2_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(spec=images, seq=ops, cache=st.sampled_from([0, 8192, 1 << 20]),
       pend_limit=st.sampled_from([1, 3, 4096]))
def test_random_ops_against_model(spec, seq, cache, pend_limit):
    with tempfile.TemporaryDirectory() as d:
        img, model = make_image(d, spec)
        fd = os.open(img, os.O_RDWR)
        with Qcow2Image.open(img, cache_bytes=cache) as q:
            q._pend_limit = pend_limit      # force commits in the middle of operations
            for op, off, ln, byte in seq:
                ln = min(ln, SIZE - off)
                if op == "write":
                    data = bytes([byte]) * ln if byte % 3 else os.urandom(ln)
                    q.write(off, data)
                    model[off:off + ln] = data
                elif op == "discard":
                    q.discard(off, ln)
                    model[off:off + ln] = bytes(ln)
                elif op in ("zero", "zero_unmap"):
                    q.write_zeroes(off, ln, unmap=op == "zero_unmap")
                    model[off:off + ln] = bytes(ln)
                elif op == "flush":
                    q.flush()
                elif op == "native_write":
                    # what the native core will do: write at the host offset it was given
                    cs = q.cluster_size
                    ln = min(ln, cs - off % cs)          # one cluster, like chunk_sectors
                    data = bytes([byte]) * ln
                    h = q.allocate_for_write(off, ln, pin=True)
                    try:
                        if h is None:
                            q.write(off, data)
                        else:
                            os.pwrite(fd, data, h)
                    finally:
                        q.unpin()
                    model[off:off + ln] = data
                elif op == "map":
                    for g, n, kind, host in q.map_range(off, ln):
                        if kind == "data":
                            assert os.pread(fd, n, host) == bytes(model[g:g + n])
                        elif kind in ("zero", "unallocated"):
                            assert not any(model[g:g + n])
                else:
                    assert q.read(off, ln) == bytes(model[off:off + ln])
            assert q.read(0, SIZE) == bytes(model)
        os.close(fd)
        raw = os.path.join(d, "model.raw")
        with open(raw, "wb") as f:
            f.write(model)
        rc, out = check_rc(img)
        assert rc == 0, out
        rc, out = compare_raw(img, raw)
        assert rc == 0, out
