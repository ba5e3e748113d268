"""Damaged or unsupported images: a clear Qcow2Error naming the problem, never a hang."""
import signal
import struct

import pytest

from qcow2_helpers import qemu_img, qemu_io
from ublk_plugins.qcow2 import Qcow2Error, Qcow2Image

MiB = 1 << 20


@pytest.fixture(autouse=True)
def alarm():
    def boom(*_):
        raise TimeoutError("operation hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "d.qcow2"
    qemu_img("create", "-f", "qcow2", p, "4M")
    qemu_io(p, "write -P 0x61 0 128k")
    return p


def poke(path, off, fmt, *vals):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, *vals))


def peek(path, off, fmt):
    with open(path, "rb") as f:
        f.seek(off)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


def read_everything(path, **kw):
    with Qcow2Image.open(path, **kw) as q:
        q.read(0, q.size)


HEADER_CASES = [
    ("bad magic", 0, ">4s", b"QFI\x00", "bad magic"),
    ("version", 4, ">I", 4, "version"),
    ("cluster bits", 20, ">I", 31, "cluster_bits"),
    ("encryption", 32, ">I", 1, "encrypted"),
    ("huge size", 24, ">Q", 1 << 62, "L1 entries"),
    ("huge l1_size", 36, ">I", 0x7FFFFFFF, "l1_size"),
    ("l1 past eof", 40, ">Q", 1 << 40, "L1 table.*past end of file"),
    ("l1 misaligned", 40, ">Q", 0x30200, "L1 table.*not cluster aligned"),
    ("refcount table past eof", 48, ">Q", 1 << 40, "refcount table.*past end of file"),
    ("huge refcount table", 56, ">I", 0x7FFFFFFF, "refcount_table_clusters"),
    ("unknown incompatible bit", 72, ">Q", 1 << 20, "unknown incompatible"),
    ("external data file", 72, ">Q", 4, "external data file"),
    ("refcount order", 96, ">I", 7, "refcount_order"),
    ("header length", 100, ">I", 50, "header_length"),
    ("huge nb_snapshots", 60, ">I", 0x7FFFFFFF, "too many snapshots"),
    ("snapshots past eof", 60, ">I", 3, "snapshot table"),
    ("backing name outside cluster", 8, ">Q", 1 << 20, "backing file name"),
]


@pytest.mark.parametrize("name,off,fmt,val,msg", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_header(img, name, off, fmt, val, msg):
    if name == "snapshots past eof":
        poke(img, 64, ">Q", 1 << 40)
    if name == "backing name outside cluster":
        poke(img, 16, ">I", 10)
    poke(img, off, fmt, val)
    with pytest.raises(Qcow2Error, match=msg) as ei:
        read_everything(img)
    assert str(img) in str(ei.value)


def test_truncated(tmp_path, img):
    data = img.read_bytes()
    for n in (0, 50, 90, 70000):
        p = tmp_path / f"t{n}.qcow2"
        p.write_bytes(data[:n])
        with pytest.raises(Qcow2Error, match="truncated|past end of file|shorter"):
            read_everything(p, readonly=True)


def test_overlapping_metadata(img):
    poke(img, 40, ">Q", peek(img, 48, ">Q"))   # L1 == refcount table
    with pytest.raises(Qcow2Error, match="overlapping metadata"):
        read_everything(img)


def l1_entry_off(path):
    return peek(path, 40, ">Q")


def test_l2_table_past_eof(img):
    poke(img, l1_entry_off(img), ">Q", (1 << 63) | (1 << 40))
    with pytest.raises(Qcow2Error, match="L2 table.*past end of file"):
        read_everything(img)


def test_l2_table_overlaps_header(img):
    poke(img, l1_entry_off(img), ">Q", (1 << 63) | peek(img, 48, ">Q"))
    with pytest.raises(Qcow2Error, match="overlapping metadata"):
        read_everything(img)


def test_l2_entry_past_eof(img):
    l2 = peek(img, l1_entry_off(img), ">Q") & 0x00FFFFFFFFFFFE00
    poke(img, l2 + 8, ">Q", (1 << 63) | (1 << 44))
    with pytest.raises(Qcow2Error, match="L2 entry points past end of file"):
        read_everything(img)
    with Qcow2Image.open(img) as q:   # other clusters remain readable
        assert q.read(0, 65536) == b"\x61" * 65536


def test_refcount_block_past_eof_on_write(img):
    rt = peek(img, 48, ">Q")
    poke(img, rt, ">Q", 1 << 40)
    with Qcow2Image.open(img) as q:
        assert q.read(0, 4096) == b"\x61" * 4096
        with pytest.raises(Qcow2Error, match="refcount block.*past end of file"):
            q.write(2 * MiB, b"x" * 4096)


@pytest.mark.parametrize("bit,word", [(1, "dirty"), (2, "corrupt")])
def test_dirty_corrupt_need_readonly(img, bit, word):
    poke(img, 72, ">Q", bit)
    with pytest.raises(Qcow2Error, match=f"{word}.*readonly=True"):
        Qcow2Image.open(img)
    with Qcow2Image.open(img, readonly=True) as q:
        assert q.read(0, 4096) == b"\x61" * 4096


def test_backing_missing_and_loop(tmp_path):
    top = tmp_path / "top.qcow2"
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "1M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "1M")
    base.unlink()
    with pytest.raises(Qcow2Error, match="backing file .* not found"):
        Qcow2Image.open(top)
    # make base point back at top
    qemu_img("create", "-f", "qcow2", "-b", "top.qcow2", "-F", "qcow2", base, "1M", check=False)
    qemu_img("rebase", "-u", "-b", "top.qcow2", "-F", "qcow2", base, check=False)
    with pytest.raises(Qcow2Error, match="loop|deeper"):
        Qcow2Image.open(top)


def test_corrupt_compressed_data(tmp_path):
    p = tmp_path / "c.qcow2"
    qemu_img("create", "-f", "qcow2", p, "1M")
    qemu_io(p, "write -c -P 0x42 0 64k")
    with Qcow2Image.open(p) as q:
        (_g, _n, kind, _h), = q.map_range(0, 65536)
        assert kind == "compressed"
        e, _ = q._entry(0)
        coff, _nsec = q._compressed_span(e)
    poke(p, coff, ">Q", 0xFFFFFFFFFFFFFFFF)
    with pytest.raises(Qcow2Error, match="compressed cluster.*corrupt"):
        read_everything(p)


def test_zstd_without_module_is_clear(tmp_path):
    p = tmp_path / "z.qcow2"
    r = qemu_img("create", "-f", "qcow2", "-o", "compression_type=zstd", p, "1M", check=False)
    if r.returncode:
        pytest.skip("qemu-img without zstd")
    qemu_io(p, "write -c -P 0x42 0 64k")
    from ublk_plugins.qcow2 import engine
    if engine._zstd_decompressor() is None:
        with pytest.raises(Qcow2Error, match="zstd"):
            read_everything(p)
    else:
        with Qcow2Image.open(p) as q:
            assert q.read(0, 65536) == b"\x42" * 65536


def test_fuzzed_metadata(tmp_path):
    """Random corruption (mostly of metadata): Qcow2Error or success, nothing else."""
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", src, "2M")
    qemu_io(src, "write -c -P 0x11 0 64k", "write -P 0x22 100k 300k", "write -z 600k 64k")
    qemu_img("snapshot", "-c", "s", src)
    qemu_io(src, "write -P 0x33 120k 8k")
    data = src.read_bytes()
    p = tmp_path / "f.qcow2"
    errors = 0
    for it in range(80):
        rnd = __import__("random").Random(it)
        b = bytearray(data)
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randrange(0, 4096 * 8) if rnd.random() < 0.7 else rnd.randrange(len(b))
            r = rnd.random()
            if r < 0.4:
                pos = pos // 8 * 8
                v = rnd.choice([rnd.randrange(1 << 64), rnd.randrange(1 << 24) << 9 | 1 << 63,
                                rnd.randrange(1 << 20), 1 << 62 | rnd.randrange(1 << 40)])
                b[pos:pos + 8] = v.to_bytes(8, "big")
            elif r < 0.7:
                b[pos] = rnd.randrange(256)
            else:
                b[pos] ^= 1 << rnd.randrange(8)
        p.write_bytes(bytes(b))
        for ro in (True, False):
            try:
                with Qcow2Image.open(p, readonly=ro, cache_bytes=8192) as q:
                    q.read(0, min(q.size, 4 << 20))
                    if not ro:
                        sz = min(q.size, 2 << 20)
                        for _ in range(10):
                            o = rnd.randrange(sz)
                            n = min(rnd.randrange(1, 9000), sz - o)
                            if rnd.random() < 0.7:
                                q.write(o, b"x" * n)
                            else:
                                q.discard(o, n)
                        q.flush()
            except Qcow2Error as e:
                assert str(p) in str(e)
                errors += 1
    assert errors > 10
