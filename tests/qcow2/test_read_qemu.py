"""Images made by qemu read byte-identical to `qemu-img convert -O raw`."""
import os
import random

import pytest

from qcow2_helpers import qemu_img, qemu_io, to_raw
from ublk_plugins.qcow2 import Qcow2Error, Qcow2Image, create

MiB = 1 << 20


def compat(version):
    return "0.10" if version == 2 else "1.1"


def read_all(img, chunk=None, rnd=None, **kw):
    with Qcow2Image.open(img, readonly=True, **kw) as q:
        out = bytearray(q.size)
        mv = memoryview(out)
        if chunk is None:
            q.readinto(0, mv)
        else:
            pos = 0
            while pos < q.size:
                n = min(q.size - pos, rnd.randrange(1, chunk) if rnd else chunk)
                q.readinto(pos, mv[pos:pos + n])
                pos += n
        return bytes(out)


def pattern_cmds(size, cs, rnd, zero=True, compressed=False):
    cmds = []
    if compressed:  # qemu only compresses into unallocated clusters: do these first
        for k in rnd.sample(range(size // cs), 3):
            cmds.append(f"write -c -P 0x{rnd.randrange(1, 255):02x} {k * cs} {cs}")
    for _ in range(12):
        off = rnd.randrange(0, size - 8192) // 512 * 512
        ln = rnd.randrange(1, 16) * 512
        cmds.append(f"write -P 0x{rnd.randrange(1, 255):02x} {off} {ln}")
    if zero:
        off = rnd.randrange(0, size // cs - 2) * cs
        cmds.append(f"write -z {off} {2 * cs}")
        off = rnd.randrange(0, size - 8192) // 512 * 512
        cmds.append(f"write -z {off} 4096")
    return cmds


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("cs", [4096, 65536, 2 * MiB])
def test_read_matches_qemu(tmp_path, version, cs):
    size = 16 * MiB if cs == 2 * MiB else 6 * MiB + 12345 // 512 * 512
    img = tmp_path / "a.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat(version)},cluster_size={cs}",
             img, size)
    rnd = random.Random(version * 7 + cs)
    qemu_io(img, *pattern_cmds(size, cs, rnd, zero=True, compressed=True))
    ref = to_raw(img, tmp_path / "a.raw")
    assert read_all(img) == ref
    assert read_all(img, chunk=3 * cs // 2 + 7, rnd=rnd) == ref
    with Qcow2Image.open(img) as q:
        assert q.size == size and q.cluster_size == cs and q.version == version
        kinds = {k for _g, _n, k, _h in q.map_range(0, size)}
        assert "data" in kinds
        if cs < 2 * MiB:  # with 8 clusters, later writes may cover them all
            assert "compressed" in kinds
        assert ("zero" in kinds) == (version == 3)


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("cs", [4096, 65536, 2 * MiB])
def test_read_compressed_convert(tmp_path, version, cs):
    size = 8 * MiB
    src = tmp_path / "src.raw"
    rnd = random.Random(cs)
    data = bytearray(size)
    for _ in range(40):
        off = rnd.randrange(size - 70000)
        n = rnd.randrange(1, 70000)
        # compressible but not trivial
        data[off:off + n] = (bytes([rnd.randrange(256)]) * 64 + rnd.randbytes(64)) * (n // 128) + \
            bytes(n % 128)
    src.write_bytes(bytes(data))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"compat={compat(version)},cluster_size={cs}",
             src, img)
    assert read_all(img) == bytes(data)
    with Qcow2Image.open(img, readonly=True) as q:
        assert any(k == "compressed" for _g, _n, k, _h in q.map_range(0, size))


@pytest.mark.parametrize("cs", [65536, 4096])
def test_backing_chain_depth3_relative(tmp_path, cs):
    """raw base <- qcow2 (-F raw) <- qcow2 <- qcow2, each in its own directory."""
    size = 4 * MiB
    for d in "abcd":
        (tmp_path / d).mkdir()
    rnd = random.Random(3)
    base = tmp_path / "a" / "base.raw"
    base.write_bytes(rnd.randbytes(size - 3 * 65536))       # shorter than the overlay
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", "-b", "../a/base.raw",
             "-F", "raw", tmp_path / "b" / "l1.qcow2", size)
    qemu_io(tmp_path / "b" / "l1.qcow2", *pattern_cmds(size, cs, rnd))
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs},compat=0.10", "-b",
             "../b/l1.qcow2", "-F", "qcow2", tmp_path / "c" / "l2.qcow2", size)
    qemu_io(tmp_path / "c" / "l2.qcow2", *pattern_cmds(size, cs, rnd, zero=False))
    top = tmp_path / "d" / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"cluster_size={cs}", "-b", "../c/l2.qcow2",
             "-F", "qcow2", top, size)
    qemu_io(top, *pattern_cmds(size, cs, rnd, compressed=True))
    ref = to_raw(top, tmp_path / "top.raw")
    # open from another working directory: paths must resolve against the image's dir
    cwd = os.getcwd()
    os.chdir(tmp_path / "a")
    try:
        assert read_all(os.path.relpath(top)) == ref
    finally:
        os.chdir(cwd)
    with Qcow2Image.open(top, readonly=True) as q:
        kinds = {k for _g, _n, k, _h in q.map_range(0, size)}
        assert "backing" in kinds


def test_backing_format_probe(tmp_path):
    """No backing-format extension: the format is probed (qcow2 and raw)."""
    size = 2 * MiB
    rnd = random.Random(5)
    raw = tmp_path / "base.raw"
    raw.write_bytes(rnd.randbytes(size))
    mid = tmp_path / "mid.qcow2"
    create(mid, size, backing="base.raw", _backing_format_ext=False)
    top = tmp_path / "top.qcow2"
    create(top, size, cluster_size=4096, backing="mid.qcow2", _backing_format_ext=False)
    with Qcow2Image.open(mid) as q:
        assert q.backing_format is None
        q.write(1000, b"x" * 5000)
    qemu_io(top, "write -P 0x33 70000 1000")
    ref = to_raw(top, tmp_path / "top.raw")
    assert read_all(top) == ref
    exp = bytearray(raw.read_bytes())
    exp[1000:6000] = b"x" * 5000
    exp[70000:71000] = b"\x33" * 1000
    assert ref == bytes(exp)


def test_snapshots_read(tmp_path):
    size = 4 * MiB
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", img, size)
    rnd = random.Random(9)
    qemu_io(img, *pattern_cmds(size, 4096, rnd))
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, *pattern_cmds(size, 4096, rnd))
    qemu_img("snapshot", "-c", "second", img)
    qemu_io(img, *pattern_cmds(size, 4096, rnd, compressed=True))
    with Qcow2Image.open(img, readonly=True) as q:
        assert [(n, s) for _i, n, s in q.snapshots] == [("first", size), ("second", size)]
        ids = [i for i, _n, _s in q.snapshots]
    assert read_all(img) == to_raw(img, tmp_path / "act.raw")
    for sid, name in zip(ids, ["first", "second"]):
        ref = to_raw(img, tmp_path / f"{name}.raw", snapshot=name)
        assert read_all(img, snapshot=name) == ref
        assert read_all(img, snapshot=sid) == ref
        with Qcow2Image.open(img, snapshot=name) as q:
            assert q.readonly
            with pytest.raises(Qcow2Error, match="read-only"):
                q.write(0, b"x")
    with pytest.raises(Qcow2Error, match="not found"):
        Qcow2Image.open(img, snapshot="nope")


def test_extended_l2_read_only(tmp_path):
    size = 4 * MiB
    base = tmp_path / "base.raw"
    rnd = random.Random(11)
    base.write_bytes(rnd.randbytes(size))
    img = tmp_path / "x.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=65536", "-b",
             "base.raw", "-F", "raw", img, size)
    qemu_io(img, "write -P 0x11 4096 2048", "write -z 65536 4096", "write -P 0x22 200000 70000",
            "write -z 1048576 131072", "write -c -P 0x44 2097152 65536")
    with pytest.raises(Qcow2Error, match="extended L2"):
        Qcow2Image.open(img)
    assert read_all(img) == to_raw(img, tmp_path / "x.raw")


def test_refcount_widths_read(tmp_path):
    for bits in (1, 8, 64):
        img = tmp_path / f"r{bits}.qcow2"
        qemu_img("create", "-f", "qcow2", "-o", f"refcount_bits={bits}", img, 2 * MiB)
        qemu_io(img, "write -P 0x5 0 100000")
        assert read_all(img) == to_raw(img, tmp_path / f"r{bits}.raw")


def test_zstd_compressed(tmp_path):
    from ublk_plugins.qcow2 import engine
    if engine._zstd_decompressor() is None:
        pytest.skip("no zstd module (zstandard / compression.zstd); see test_damaged for the error")
    src = tmp_path / "src.raw"
    rnd = random.Random(2)
    src.write_bytes(b"".join(bytes([rnd.randrange(3)]) * rnd.randrange(1, 5000)
                             for _ in range(1500))[:4 * MiB].ljust(4 * MiB, b"\0"))
    img = tmp_path / "z.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4096",
             src, img)
    assert read_all(img) == src.read_bytes()
    with Qcow2Image.open(img) as q:
        q.write(4096 * 3 + 100, b"hello")
    qemu_img("check", img)
