import fcntl
import hashlib
import mmap
import os
import random
import shutil
import struct
import subprocess
import threading
import time

import pytest

from .runnerproc import REPO, read_direct, sh
from .test_io import run_fio

pytestmark = [pytest.mark.device,
              pytest.mark.skipif(not shutil.which("qemu-img"), reason="qemu-img (qemu-utils) missing")]


BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


def qcow2_device(name, path, queues=1, forward=True, user_copy="auto"):
    return f"""
devices:
  - name: {name}
    handler: qcow2
    queues: {queues}
    user_copy: {user_copy}
    options:
      path: {path}
      forward: {"true" if forward else "false"}
"""


def sha_direct(dev, size):
    """sha256 of the device's first size bytes, read with O_DIRECT (from the server, not the page cache)."""
    h = hashlib.sha256()
    for off in range(0, size, 1 << 20):
        h.update(read_direct(dev, off, min(1 << 20, size - off)))
    return h.hexdigest()


def check_and_compare(img, tmp_path, through_device, size):
    """qemu-img check exits 0 (no leaks, no corruption) and the image's raw content is what the
    device returned."""
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "image.raw"
    sh("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    assert sha_of(raw, size) == through_device


def sha_of(path, size):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            chunk = f.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def test_ext4_on_qcow2_then_qemu_img_agrees(runner, tmp_path):
    img = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", str(img), "128M")
    r = runner(qcow2_device("q", img))
    dev = r.devices()["q"]["block"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(mnt))
    try:
        shutil.copytree(os.path.join(REPO, "runner"), mnt / "tree", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    finally:
        sh("umount", str(mnt))
    assert sh("fsck.ext4", "-f", "-n", dev).returncode == 0
    through_device = sha_of(dev, 128 << 20)
    assert r.stop() == 0
    check = subprocess.run(["qemu-img", "check", str(img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "disk.raw"
    sh("qemu-img", "convert", "-O", "raw", str(img), str(raw))
    assert sha_of(raw, 128 << 20) == through_device


@pytest.mark.parametrize("forward,user_copy", [(True, "auto"), (True, "false"), (False, "auto")],
                         ids=["fast-path", "fast-path-buffer-mode", "python-path"])
def test_fio_verify_on_qcow2_with_2_queues(runner, tmp_path, fio, forward, user_copy):
    img = tmp_path / "f.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M")
    r = runner(qcow2_device("q", img, queues=2, forward=forward, user_copy=user_copy))
    dev = r.devices()["q"]
    assert dev["mode"] == ("python+forward" if forward else "python")
    # the first pass allocates (Python path); the second overwrites allocated clusters in place
    # and fio's verify reads them back: both forwarded on the fast path
    run_fio(fio, dev["block"])
    run_fio(fio, dev["block"], "--randseed=7")
    st = r.cli_json("stats", "q")["q"]
    fwd = st["total"]["forwarded"]
    if forward:
        assert fwd >= (24 << 20) // (8 << 10), st["total"]
        assert all(q["forward_errors"] == 0 for q in st["queues"].values()), st
        assert sum(1 for q in st["queues"].values() if q["forwarded"]) >= 1
    else:
        assert fwd == 0
    assert st["total"]["errors"] == 0
    through_device = sha_direct(dev["block"], 64 << 20)
    assert r.stop() == 0
    check_and_compare(img, tmp_path, through_device, 64 << 20)


def test_discards_and_zeroes_race_forwarded_reads(runner, tmp_path, fio):
    """Forwarded reads on clusters that discards and write-zeroes free at the same time, next to
    a verified write workload that reuses the freed clusters: no data lands in the wrong place,
    every deferred free happens (check exits 0, not 3) and the image holds what the device shows."""
    img = tmp_path / "race.qcow2"
    size = 64 << 20
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(img), str(size))
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 32M", str(img))
    r = runner(qcow2_device("q", img, queues=2))
    dev = r.devices()["q"]["block"]
    stop = threading.Event()
    counts = {"discard": 0, "zeroout": 0}

    def trimmer():
        rnd = random.Random(3)
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        try:
            while not stop.is_set():
                off = rnd.randrange(0, 32 << 20, 64 << 10)
                n = rnd.choice([64 << 10, 128 << 10])
                op = rnd.choice(["discard", "zeroout"])
                fcntl.ioctl(fd, BLKDISCARD if op == "discard" else BLKZEROOUT, struct.pack("QQ", off, n))
                counts[op] += 1
                if rnd.random() < 0.3:   # and re-allocate some of them through the Python path
                    buf[:] = bytes([rnd.randrange(1, 256)]) * 4096
                    os.pwritev(fd, [buf], off)
                time.sleep(0.002)
        finally:
            os.close(fd)

    t = threading.Thread(target=trimmer)
    t.start()
    reader = subprocess.Popen([fio, f"--filename={dev}", "--name=r", "--ioengine=io_uring", "--direct=1",
                               "--rw=randread", "--bs=4k", "--iodepth=32", "--size=32M", "--time_based",
                               "--runtime=10", "--norandommap", "--output-format=terse"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run_fio(fio, dev, "--offset=32M", "--size=24M")
    finally:
        out, err = reader.communicate(timeout=600)
        stop.set()
        t.join()
    assert reader.returncode == 0, out + err
    assert counts["discard"] and counts["zeroout"], counts
    st = r.cli_json("stats", "q")["q"]["total"]
    assert st["forwarded"] > 1000, st
    assert st["errors"] == 0, st
    assert st["ops"]["discard"] + st["ops"]["write_zeroes"] >= counts["discard"] + counts["zeroout"]
    through_device = sha_direct(dev, size)
    assert r.stop() == 0
    check_and_compare(img, tmp_path, through_device, size)
